//! `optinsync`: the daemon and its command line (DESIGN.md §8).
//!
//! Exit codes: 0 ok, 1 runtime failure, 2 bad configuration or usage.

mod commands;
mod registry;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    },
    /// Inspect contacts.
    Contact {
        #[command(subcommand)]
        command: ContactCommand,
    },
    /// The proof bundle for one person.
    Evidence {
        #[command(subcommand)]
        command: EvidenceCommand,
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
}

#[derive(Debug, Subcommand)]
enum EvidenceCommand {
    /// Every consent event with its evidence, the exact texts the person was shown, and the
    /// ledger verification that vouches for them.
    Export {
        email: String,
        #[arg(long)]
        json: bool,
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
            Command::Sync { once: true } => commands::sync_once(&cli.config).await,
            Command::Sync { once: false } => Err(Failure::Config(anyhow::anyhow!(
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
                command: EvidenceCommand::Export { email, json },
            } => commands::evidence_export(&cli.config, &email, json).await,
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
