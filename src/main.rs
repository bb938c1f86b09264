//! `optinsync`: the daemon and its command line (README.md, "Commands").
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.

mod commands;
mod data_subject;
mod gauges;
mod instance_lock;
mod jobs;
mod registry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// glibc's allocator showed ~8 % of the daemon's CPU under link load (`malloc_consolidate`,
// arena locks between the runtime's and SQLite's threads); mimalloc keeps per-thread heaps.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "optinsync",
    version,
    about = "Double opt-in consent between a CRM and a campaigns tool"
)]
struct Cli {
    /// Configuration file.
    #[arg(
        long,
        global = true,
        default_value = "config.toml",
        env = "OPTINSYNC_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon: HTTP server, periodic sync, outbox delivery.
    Run,
    /// One full pass (pull, decide, deliver), then exit.
    Sync {
        /// Required: continuous sync is `optinsync run`.
        #[arg(long)]
        once: bool,
        /// Pull and decide only; leave the outbox for `run` to deliver.
        #[arg(long)]
        no_deliver: bool,
    },
    /// Inspect contacts.
    Contact {
        #[command(subcommand)]
        command: ContactCommand,
    },
    /// The proof bundle for one person (or every person of a list).
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
    },
    /// Subject access: the person's data as a portable JSON file.
    Subject {
        #[command(subcommand)]
        command: SubjectCommand,
    },
    /// Retention of proof and of unconfirmed signups (`[retention]`).
    Retention {
        #[command(subcommand)]
        command: RetentionCommand,
    },
    /// Check the consent ledger.
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Apply database migrations and exit.
    Migrate,
    /// GDPR erasure: withdraw and suppress the address everywhere, then remove its personal
    /// data; the ledger keeps the events (and verifies), not the evidence.
    Erase { email: String },
    /// Consent per list and state, the outbox, and when open signups settle.
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Work with the campaigns tool's lists.
    Campaign {
        #[command(subcommand)]
        command: CampaignCommand,
    },
    /// The global suppression list: addresses that get no mail at all.
    Suppression {
        #[command(subcommand)]
        command: SuppressionCommand,
    },
    /// Dead letters: effects that failed for good.
    Outbox {
        #[command(subcommand)]
        command: OutboxCommand,
    },
    /// Check, test and simulate rule scripts.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Drive the configured connectors through the connector contract (the conformance kit).
    Connector {
        #[command(subcommand)]
        command: ConnectorCommand,
    },
}

#[derive(Debug, Subcommand)]
enum ConnectorCommand {
    /// One line per check, PASS/FAIL/SKIP; exit 1 if any fails. Needs no store.
    Check {
        /// Only this connector: `crm`, `campaigns` or `mail` (default: all three).
        #[arg(long)]
        connector: Option<String>,
        /// Also run the checks that write: subscribe and remove a test address on the first
        /// list, write a consent back to the first CRM record, send a test mail. Use a test
        /// account or a fake.
        #[arg(long)]
        write: bool,
        /// The address the write checks use.
        #[arg(long, default_value = "conformance-check@example.org")]
        address: String,
    },
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Every consent event with its evidence, the exact texts the person was shown, and the
    /// ledger verification that vouches for them.
    Export {
        /// The person's address (or `--all --list NAME`).
        #[arg(required_unless_present = "all")]
        email: Option<String>,
        /// Shorthand for `--format json`.
        #[arg(long, conflicts_with = "format")]
        json: bool,
        /// `text` (default), `json` (the bundle), or `html` (a printable page of the bundle).
        #[arg(long, value_enum)]
        format: Option<data_subject::ProofFormat>,
        /// Write to this file instead of standard output; with `--all`, the directory.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Every contact with consent recorded on `--list`: JSON and HTML per contact plus an
        /// index, into `--out DIR`.
        #[arg(long, requires = "list", requires = "out", conflicts_with_all = ["email", "json", "format"])]
        all: bool,
        #[arg(long, requires = "all")]
        list: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum SubjectCommand {
    /// The person's data (contact fields, CRM record ids, consent per list, events,
    /// engagement) as JSON, schema `optinsync.subject-export` version 1.
    Export {
        email: String,
        /// Write to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
}

#[derive(Debug, Subcommand)]
enum RetentionCommand {
    /// Apply `[retention]` now (the daemon does it every `[retention] every`).
    Run {
        /// Only list what would be purged.
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum SuppressionCommand {
    /// Every suppressed address hash, its reason and since when.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Whether an address is suppressed, why and since when.
    Show {
        address: String,
        #[arg(long)]
        json: bool,
    },
    /// Take an address off the list, recorded in the ledger; sends nothing by itself.
    Lift {
        address: String,
        /// Why (kept in the ledger).
        #[arg(long)]
        reason: String,
    },
}

#[derive(Debug, Subcommand)]
enum OutboxCommand {
    /// List dead letters with their reason.
    Failed {
        #[arg(long)]
        json: bool,
    },
    /// Queue dead letters again (after fixing the cause).
    Retry {
        /// Outbox ids; or `--all`.
        ids: Vec<i64>,
        #[arg(long, conflicts_with = "ids")]
        all: bool,
    },
    /// Give up on dead letters for good.
    Drop {
        ids: Vec<i64>,
        /// Also drop removals from a campaigns list (leaves the address on the list: a legal risk).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum CampaignCommand {
    /// Take the members of an existing list (no DOI proof) into the ledger as `asserted`, so
    /// the rules ask each of them to confirm and remove those who do not.
    ImportExisting {
        /// The optinsync list id (`[[lists]] id`).
        #[arg(long)]
        list: String,
    },
    /// Forecast, day by day, the DOI, reminder and re-permission mails the rules and the
    /// sending plan (`[lists.sending]`) send, and the signups that lapse. Changes nothing.
    Plan {
        /// One list (default: every list).
        #[arg(long)]
        list: Option<String>,
        /// Days to forecast (at most 366).
        #[arg(long, default_value_t = 14)]
        days: u32,
        #[arg(long)]
        json: bool,
    },
    /// Lift a pause the stop rules put on a list's waves (recorded in the ledger).
    Resume {
        #[arg(long)]
        list: String,
    },
    /// What a list's campaign came to: asked, confirmed, lapsed, bounced by class, removed.
    Report {
        #[arg(long)]
        list: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RulesCommand {
    /// Compile every script and run the table tests; print file:line:column of any error.
    Check {
        /// Rules directory (default: `rules.dir` from the config).
        #[arg(long)]
        rules: Option<PathBuf>,
    },
    /// Run the table tests and list each result.
    Test {
        #[arg(long)]
        rules: Option<PathBuf>,
    },
    /// What a candidate rule set would do to every contact now, against the rules in force.
    /// Changes nothing.
    Simulate {
        /// Candidate rules directory (default: `rules.dir`).
        #[arg(long)]
        rules: Option<PathBuf>,
        /// Contact ids to show per action.
        #[arg(long, default_value_t = 3)]
        samples: usize,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ContactCommand {
    /// Consent per list and the full event history with its evidence.
    Show {
        email: String,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum LedgerCommand {
    /// Recompute the hash chain; fails naming the first altered or missing event.
    Verify,
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub enum Failure {
    /// Bad configuration or usage: exit 2.
    Config(anyhow::Error),
    /// Runtime failure: exit 1.
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure::Runtime(e.into())
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("optinsync: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run => commands::run(&cli.config).await,
            Command::Sync {
                once: true,
                no_deliver,
            } => commands::sync_once(&cli.config, !no_deliver).await,
            Command::Sync { once: false, .. } => Err(Failure::Config(anyhow::anyhow!(
                "`sync` needs `--once`; continuous sync is `optinsync run`"
            ))),
            Command::Contact {
                command: ContactCommand::Show { email, json },
            } => commands::contact_show(&cli.config, &email, json).await,
            Command::Ledger {
                command: LedgerCommand::Verify,
            } => commands::ledger_verify(&cli.config).await,
            Command::Migrate => commands::migrate(&cli.config).await,
            Command::Erase { email } => commands::erase(&cli.config, &email).await,
            Command::Status { json } => commands::status(&cli.config, json).await,
            Command::Evidence {
                command:
                    EvidenceCommand::Export {
                        all: true,
                        list: Some(list),
                        out: Some(out),
                        ..
                    },
            } => data_subject::evidence_export_all(&cli.config, &list, &out).await,
            Command::Evidence {
                command:
                    EvidenceCommand::Export {
                        email: Some(email),
                        json,
                        format,
                        out,
                        ..
                    },
            } => {
                let format = format.unwrap_or(if json {
                    data_subject::ProofFormat::Json
                } else {
                    data_subject::ProofFormat::Text
                });
                data_subject::evidence_export(&cli.config, &email, format, out.as_deref()).await
            }
            Command::Evidence { .. } => Err(Failure::Config(anyhow::anyhow!(
                "`evidence export` needs an address, or `--all --list NAME --out DIR`"
            ))),
            Command::Subject {
                command: SubjectCommand::Export { email, out },
            } => data_subject::subject_export(&cli.config, &email, out.as_deref()).await,
            Command::Retention {
                command: RetentionCommand::Run { dry_run, json },
            } => data_subject::retention_run(&cli.config, dry_run, json).await,
            Command::Suppression {
                command: SuppressionCommand::List { json },
            } => commands::suppression_list(&cli.config, json).await,
            Command::Suppression {
                command: SuppressionCommand::Show { address, json },
            } => commands::suppression_show(&cli.config, &address, json).await,
            Command::Suppression {
                command: SuppressionCommand::Lift { address, reason },
            } => commands::suppression_lift(&cli.config, &address, &reason).await,
            Command::Outbox {
                command: OutboxCommand::Failed { json },
            } => commands::outbox_failed(&cli.config, json).await,
            Command::Outbox {
                command: OutboxCommand::Retry { ids, all },
            } => commands::outbox_retry(&cli.config, &ids, all).await,
            Command::Outbox {
                command: OutboxCommand::Drop { ids, force },
            } => commands::outbox_drop(&cli.config, &ids, force).await,
            Command::Campaign {
                command: CampaignCommand::ImportExisting { list },
            } => commands::import_existing(&cli.config, &list).await,
            Command::Campaign {
                command: CampaignCommand::Plan { list, days, json },
            } => commands::campaign_plan(&cli.config, list.as_deref(), days, json).await,
            Command::Campaign {
                command: CampaignCommand::Resume { list },
            } => commands::campaign_resume(&cli.config, &list).await,
            Command::Campaign {
                command: CampaignCommand::Report { list, json },
            } => commands::campaign_report(&cli.config, &list, json).await,
            Command::Rules {
                command: RulesCommand::Check { rules },
            } => commands::rules_check(&cli.config, rules.as_deref(), false).await,
            Command::Rules {
                command: RulesCommand::Test { rules },
            } => commands::rules_check(&cli.config, rules.as_deref(), true).await,
            Command::Rules {
                command:
                    RulesCommand::Simulate {
                        rules,
                        samples,
                        json,
                    },
            } => commands::rules_simulate(&cli.config, rules.as_deref(), samples, json).await,
            Command::Connector {
                command:
                    ConnectorCommand::Check {
                        connector,
                        write,
                        address,
                    },
            } => commands::connector_check(&cli.config, connector.as_deref(), write, address).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("optinsync: {e:#}");
            ExitCode::from(2)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("optinsync: {e:#}");
            ExitCode::from(1)
        }
    }
}
