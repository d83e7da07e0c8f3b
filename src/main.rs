use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "teachd",
    version,
    about = "Teacher LLMs for distillation, with keys, limits and a usage ledger"
)]
struct Cli {
    /// Config file (TOML). Environment variables `TEACHD__SECTION__KEY` override it.
    #[arg(long, short, env = "TEACHD_CONFIG", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the HTTP API.
    Serve,
    /// Run database migrations and exit.
    Migrate,
    /// Print the OpenAPI document (JSON).
    Openapi,
    /// Administration from the command line.
    #[command(subcommand)]
    Admin(AdminCommand),
    /// Usage-ledger audits.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Batch jobs against a server: submit a file and follow it, status, cancel, download.
    Batch {
        #[command(subcommand)]
        command: teachd::batch::cli::BatchCommand,
    },
    /// The ledger's signing key.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create the ledger's Ed25519 signing key (mode 0600; never replaces an existing file) and
    /// print its verifier key.
    Init {
        /// Where to write it. Default: `tlog.key_file`.
        #[arg(long)]
        out: Option<PathBuf>,
        /// The key's name. Default: `tlog.origin`.
        #[arg(long)]
        name: Option<String>,
    },
    /// Print the verifier key of the configured signing key.
    Show,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Create the `admin` client if needed and print a new admin key (shown only this once).
    Bootstrap,
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the ledger's hash chain; prints a JSON report and exits 1 when a row is bad.
    Verify {
        /// Inclusive start (RFC 3339 or YYYY-MM-DD, UTC). Default: the first row.
        #[arg(long)]
        from: Option<String>,
        /// Exclusive end. Default: the last row.
        #[arg(long)]
        to: Option<String>,
        /// A signed checkpoint saved earlier (repeatable): the Merkle tree recomputed from the
        /// rows must match it (tail truncation, rewritten rows and a replaced history fail).
        #[arg(long = "checkpoint")]
        checkpoints: Vec<PathBuf>,
        /// The log's verifier key (`name+id+key`). Default: that of the configured signing key.
        #[arg(long)]
        key: Option<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // Logs go to stderr: stdout carries command output (`admin bootstrap`'s key, `openapi`).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,mistralrs_core=warn".into()),
        )
        .init();
    let cli = Cli::parse();
    if let Command::Openapi = cli.command {
        println!("{}", teachd::http::openapi().to_pretty_json()?);
        return Ok(());
    }
    if let Command::Batch { command } = cli.command {
        // A client of a server: no configuration, no database.
        std::process::exit(teachd::batch::cli::run(command).await?);
    }
    let config = teachd::config::Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Serve => {
            let listener = tokio::net::TcpListener::bind(&config.server.bind).await?;
            let state = teachd::build_state(config).await?;
            tracing::info!(addr = %listener.local_addr()?, "teachd listening");
            teachd::serve(listener, state, teachd::shutdown_signal()).await
        }
        Command::Migrate => {
            let db = teachd::db::connect(&config.database).await?;
            teachd::db::migrate_as_owner(&config.database, &db).await?;
            println!("migrations applied");
            Ok(())
        }
        Command::Openapi | Command::Batch { .. } => unreachable!("handled above"),
        Command::Admin(AdminCommand::Bootstrap) => {
            let db = teachd::db::connect(&config.database).await?;
            if config.database.migrate_on_start {
                teachd::db::migrate_as_owner(&config.database, &db).await?;
            }
            let (record, key) = teachd::store::bootstrap_admin(&db).await?;
            eprintln!(
                "Admin key {} (id {}) created. It is printed below once and stored only as a hash:",
                record.prefix, record.id
            );
            println!("{}", key.expose_secret());
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Init { out, name },
        } => {
            let path = out.unwrap_or_else(|| config.tlog.key_file.clone());
            let name = name.unwrap_or_else(|| config.tlog.origin.clone());
            let vkey = teachd::ledger::signing::init_key_file(&path, &name)?;
            eprintln!(
                "Signing key written to {} (mode 0600). Verifier key:",
                path.display()
            );
            println!("{vkey}");
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Show,
        } => {
            let mut cfg = config.tlog.clone();
            cfg.generate_key = false;
            println!(
                "{}",
                teachd::ledger::signing::LogKey::load(&cfg)?.verifier_key()
            );
            Ok(())
        }
        Command::Audit {
            command:
                AuditCommand::Verify {
                    from,
                    to,
                    checkpoints,
                    key,
                },
        } if !checkpoints.is_empty() => {
            let texts = checkpoints
                .iter()
                .map(|p| {
                    std::fs::read_to_string(p)
                        .map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let vkey = match key {
                Some(k) => k,
                None => {
                    let mut cfg = config.tlog.clone();
                    cfg.generate_key = false;
                    teachd::ledger::signing::LogKey::load(&cfg)?
                        .verifier_key()
                        .to_string()
                }
            };
            let range = teachd::ledger::queries::TimeRange::parse(from.as_deref(), to.as_deref())
                .map_err(|(_, msg)| anyhow::anyhow!(msg))?;
            let ranged = (from.is_some() || to.is_some()).then_some(range);
            let db = teachd::db::connect(&config.database).await?;
            let report = teachd::ledger::transparency::audit_with_range(
                &db,
                &vkey,
                &config.tlog.origin,
                &texts,
                ranged,
            )
            .await?;
            println!("{}", serde_json::to_string(&report)?);
            if !report.ok {
                std::process::exit(1);
            }
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Verify { from, to, .. },
        } => {
            let db = teachd::db::connect(&config.database).await?;
            let report = teachd::ledger::audit_verify(&db, from.as_deref(), to.as_deref()).await?;
            println!("{}", serde_json::to_string(&report)?);
            if !report.ok {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}
