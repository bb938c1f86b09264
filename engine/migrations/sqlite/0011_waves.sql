-- Sending plans and stop rules (`engine/src/waves`).
-- Mails a list's plan let the rules start, per kind of mail, plan day and recipient-domain
-- bucket (`*` is the day's total). Written in the transaction of the consent change that
-- queues the mail, so a cap holds across crashes.
CREATE TABLE wave_counts (
    list_id   TEXT NOT NULL,
    mail_kind TEXT NOT NULL,
    day       INTEGER NOT NULL,
    bucket    TEXT NOT NULL,
    admitted  INTEGER NOT NULL,
    PRIMARY KEY (list_id, mail_kind, day, bucket)
);

-- What became of a list's mails per slot (an hour of the plan's day): the stop rules' figures.
CREATE TABLE mail_outcomes (
    list_id    TEXT NOT NULL,
    slot       INTEGER NOT NULL,
    sent       INTEGER NOT NULL DEFAULT 0,
    hard       INTEGER NOT NULL DEFAULT 0,
    soft       INTEGER NOT NULL DEFAULT 0,
    policy     INTEGER NOT NULL DEFAULT 0,
    complaints INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (list_id, slot)
);
