//! The `ferrymq` command: parse the command line, set up logging, load the
//! config, run the broker until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use ferrymq_config::Config;

/// MQTT 3.1.1 + 5.0 broker for edge nodes, with store-and-forward.
///
/// Without a subcommand, runs the broker: with the embedded defaults
/// (one listener on 127.0.0.1:1883, data in ./ferrymq-data), or with the
/// file given by --config, whose keys override the defaults.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    /// Config file (TOML); every key is optional.
    #[arg(short, long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a config file: exit 0 if valid, else print every problem
    /// with its TOML key and exit 2.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
    /// Print the commented default config file.
    PrintDefaultConfig,
    /// Ask the ferrymq running on the data directory of --config to reload
    /// (SIGHUP): the config is checked first, and a broken one is refused
    /// here with every problem (exit 2).
    Reload,
    /// Inspect the stored queues (reads the data directory of --config).
    Queue {
        #[command(subcommand)]
        command: QueueCommand,
    },
    /// Inspect the bridges to upstream brokers.
    Bridge {
        #[command(subcommand)]
        command: BridgeCommand,
    },
    /// Add a user to a password file or change its password (asked twice
    /// without echo, or read from standard input with --stdin); the file is
    /// created if missing and always written atomically, mode 0600.
    Passwd {
        /// The password file (`[auth] password_file`).
        file: PathBuf,
        /// The user name.
        user: String,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        stdin: bool,
        /// Remove the user instead.
        #[arg(long, conflicts_with = "check")]
        delete: bool,
        /// Check the password instead: exit 0 if it is right, 1 if not.
        #[arg(long)]
        check: bool,
    },
}

#[derive(Subcommand)]
enum BridgeCommand {
    /// Print each bridge's state: connected or not (and to which address),
    /// backlog (messages, bytes, oldest), drain rate, last error. Read from
    /// the running ferrymq of --config's data directory.
    Status,
}

#[derive(Subcommand)]
enum QueueCommand {
    /// Print every persistent session and shared group with its queue
    /// depth, bytes and oldest-message age, and the retained count.
    Stats,
    /// List the oldest messages queued for a persistent session: sequence,
    /// age, QoS, size, topic and the start of the payload.
    List {
        /// The session's client identifier.
        client_id: String,
        /// List at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// List a bridge's dead letters (messages its upstream refused for
    /// good, kept in the session `$bridge/NAME/dead`).
    Dead {
        /// The bridge's name.
        name: String,
        /// List at most this many.
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Delete the queues a bridge removed from the config left behind
    /// (what it had not forwarded, its live lane and its dead letters):
    /// done by the running ferrymq within a second, or at its next start.
    /// Refused for a bridge still in the config.
    DeleteBridge {
        /// The removed bridge's name.
        name: String,
    },
    /// Put a bridge's dead letters back on their topics, through the
    /// bridge only, so they go upstream again: done by the running ferrymq
    /// within a second, or at its next start.
    ReplayDead {
        /// The bridge's name.
        name: String,
    },
}

/// Exit status for an invalid configuration.
const EXIT_BAD_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::PrintDefaultConfig) => {
            print!("{}", ferrymq_config::default_config_toml());
            ExitCode::SUCCESS
        }
        Some(Command::CheckConfig { file }) => match Config::from_file(&file) {
            Ok(_) => {
                println!("{}: ok", file.display());
                ExitCode::SUCCESS
            }
            Err(errors) => {
                report_config_errors(&file, &errors);
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Some(Command::Passwd {
            file,
            user,
            stdin,
            delete,
            check,
        }) => passwd(&file, &user, stdin, delete, check),
        Some(Command::Reload) => {
            let Some(file) = &cli.config else {
                eprintln!("ferrymq reload: --config FILE is required (the running node's file)");
                return ExitCode::from(EXIT_BAD_CONFIG);
            };
            let config = match load(&cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            request_reload(file, &config)
        }
        Some(Command::Queue { command }) => {
            let config = match load(&cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            match command {
                QueueCommand::Stats => queue_stats(&config),
                QueueCommand::List { client_id, limit } => queue_list(&config, &client_id, limit),
                QueueCommand::Dead { name, limit } => {
                    if !config.bridges.iter().any(|b| b.name == name) {
                        eprintln!("ferrymq queue dead: no bridge named {name:?} in the config");
                        return ExitCode::FAILURE;
                    }
                    queue_list(
                        &config,
                        &ferrymq_bridge::dead_letter_client_id(&name),
                        limit,
                    )
                }
                QueueCommand::ReplayDead { name } => replay_dead(&config, &name),
                QueueCommand::DeleteBridge { name } => delete_bridge(&config, &name),
            }
        }
        Some(Command::Bridge {
            command: BridgeCommand::Status,
        }) => {
            let config = match load(&cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            bridge_status(&config)
        }
        None => {
            let config = match load(&cli.config) {
                Ok(config) => config,
                Err(code) => return code,
            };
            let log_level = init_logging(&config.log);
            match serve(config, cli.config.clone(), log_level) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferrymq: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// `ferrymq passwd`.
fn passwd(file: &std::path::Path, user: &str, stdin: bool, delete: bool, check: bool) -> ExitCode {
    use ferrymq_broker::users::{PasswordFile, check_name};
    let fail = |why: &dyn std::fmt::Display| {
        eprintln!("ferrymq passwd: {why}");
        ExitCode::FAILURE
    };
    if let Err(e) = check_name(user) {
        return fail(&e);
    }
    let mut users = match PasswordFile::load(file, !check && !delete) {
        Ok(users) => users,
        Err(e) => return fail(&format_args!("{}: {e}", file.display())),
    };
    if delete {
        if let Err(e) = users.remove(user) {
            return fail(&e);
        }
    } else {
        let password = match read_password(stdin, !check) {
            Ok(p) => p,
            Err(e) => return fail(&e),
        };
        if check {
            return if users.check(user, &password) {
                println!("{user}: password ok");
                ExitCode::SUCCESS
            } else {
                eprintln!("{user}: wrong password or no such user");
                ExitCode::FAILURE
            };
        }
        if let Err(e) = users.set(user, &password) {
            return fail(&e);
        }
    }
    match users.save(file) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// A password: the first line of standard input (`stdin`), or asked on the
/// terminal without echo (twice when `confirm`).
fn read_password(stdin: bool, confirm: bool) -> Result<String, String> {
    let password = if stdin {
        let mut line = String::new();
        std::io::stdin()
            .read_line(&mut line)
            .map_err(|e| format!("cannot read standard input: {e}"))?;
        line.trim_end_matches(['\n', '\r']).to_owned()
    } else {
        let first = rpassword::prompt_password("Password: ").map_err(|e| e.to_string())?;
        if confirm {
            let again = rpassword::prompt_password("Again: ").map_err(|e| e.to_string())?;
            if again != first {
                return Err("the passwords differ".into());
            }
        }
        first
    };
    if password.is_empty() {
        return Err("the password must not be empty".into());
    }
    Ok(password)
}

fn queue_stats(config: &Config) -> ExitCode {
    let running = ferrymq_broker::DataDir::is_in_use(&config.data_dir);
    match ferrymq_broker::storage::queue_stats(
        &config.data_dir,
        running,
        config.limits.max_topic_levels,
    ) {
        Ok(report) => {
            print!("{report}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferrymq queue stats: {e}");
            ExitCode::FAILURE
        }
    }
}

fn queue_list(config: &Config, client_id: &str, limit: usize) -> ExitCode {
    let running = ferrymq_broker::DataDir::is_in_use(&config.data_dir);
    match ferrymq_broker::storage::queue_list(&config.data_dir, running, client_id, limit) {
        Ok(Some((messages, total))) => {
            println!("{client_id}: {total} messages queued");
            for m in &messages {
                print!("{m}");
            }
            if total > messages.len() as u64 {
                println!("... {} more (--limit)", total - messages.len() as u64);
            }
            ExitCode::SUCCESS
        }
        Ok(None) => {
            eprintln!("ferrymq queue list: no persistent session {client_id:?}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("ferrymq queue list: {e}");
            ExitCode::FAILURE
        }
    }
}

fn bridge_status(config: &Config) -> ExitCode {
    if config.bridges.is_empty() {
        println!("no bridge is configured");
        return ExitCode::SUCCESS;
    }
    if !ferrymq_broker::DataDir::is_in_use(&config.data_dir) {
        eprintln!(
            "ferrymq is not running on {}: no live bridge status (`ferrymq queue stats` shows what is queued)",
            config.data_dir.display()
        );
        return ExitCode::FAILURE;
    }
    match ferrymq_bridge::read_status(&config.data_dir) {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!(
                "ferrymq bridge status: cannot read {}: {e}",
                config.data_dir.join(ferrymq_bridge::STATUS_FILE).display()
            );
            ExitCode::FAILURE
        }
    }
}

fn replay_dead(config: &Config, name: &str) -> ExitCode {
    if !config.bridges.iter().any(|b| b.name == name) {
        eprintln!("ferrymq queue replay-dead: no bridge named {name:?} in the config");
        return ExitCode::FAILURE;
    }
    leave_request(
        config,
        "replay-dead",
        &format!("replay of {name}'s dead letters"),
        || ferrymq_bridge::request_replay(&config.data_dir, name),
    )
}

fn delete_bridge(config: &Config, name: &str) -> ExitCode {
    if config.bridges.iter().any(|b| b.name == name) {
        eprintln!(
            "ferrymq queue delete-bridge: bridge {name:?} is in the config: remove it and reload first"
        );
        return ExitCode::FAILURE;
    }
    leave_request(
        config,
        "delete-bridge",
        &format!("deletion of {name}'s queues"),
        || ferrymq_bridge::request_delete(&config.data_dir, name),
    )
}

/// Leaves a request (`write`) in the data directory for the node that
/// runs on it, or for its next start, and says which.
fn leave_request(
    config: &Config,
    command: &str,
    what: &str,
    write: impl FnOnce() -> std::io::Result<PathBuf>,
) -> ExitCode {
    if let Err(e) = std::fs::create_dir_all(&config.data_dir) {
        eprintln!(
            "ferrymq queue {command}: {}: {e}",
            config.data_dir.display()
        );
        return ExitCode::FAILURE;
    }
    match write() {
        Ok(_) if ferrymq_broker::DataDir::is_in_use(&config.data_dir) => {
            println!("{what} requested: the running ferrymq does it within a second");
            ExitCode::SUCCESS
        }
        Ok(_) => {
            println!("{what} requested: ferrymq does it when it starts");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ferrymq queue {command}: cannot write the request: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The config of `--config FILE`, or the embedded defaults.
fn load(file: &Option<PathBuf>) -> Result<Config, ExitCode> {
    match file {
        Some(file) => Config::from_file(file).map_err(|errors| {
            report_config_errors(file, &errors);
            ExitCode::from(EXIT_BAD_CONFIG)
        }),
        None => Ok(Config::default()),
    }
}

fn report_config_errors(file: &std::path::Path, errors: &ferrymq_config::ConfigErrors) {
    for error in errors {
        eprintln!("{}: {error}", file.display());
    }
}

/// Sets the log level of the running node.
type SetLevel = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// Changes the log level of a running node (`None` when `RUST_LOG`
/// decides it).
type LogLevel = Option<SetLevel>;

/// Logs to standard error at `[log] level` (`RUST_LOG` wins when set),
/// as text or JSON lines (`[log] format`).
fn init_logging(log: &ferrymq_config::Log) -> LogLevel {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&log.level));
    let base = tracing_subscriber::fmt().with_writer(std::io::stderr);
    let setter = match log.format {
        ferrymq_config::LogFormat::Text => {
            let builder = base
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            level_setter(handle)
        }
        ferrymq_config::LogFormat::Json => {
            let builder = base
                .json()
                .with_ansi(false)
                .with_env_filter(filter)
                .with_filter_reloading();
            let handle = builder.reload_handle();
            builder.init();
            level_setter(handle)
        }
    };
    (!from_env).then_some(setter)
}

/// Sets the level through a reloadable filter.
fn level_setter<S: 'static>(
    handle: tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, S>,
) -> SetLevel {
    Box::new(move |level: &str| {
        handle
            .reload(tracing_subscriber::EnvFilter::new(level))
            .map_err(|e| e.to_string())
    })
}

/// `ferrymq reload`: SIGHUP to the node holding the config's data
/// directory.
fn request_reload(file: &std::path::Path, config: &Config) -> ExitCode {
    let Some(pid) = ferrymq_broker::DataDir::holder_pid(&config.data_dir) else {
        eprintln!(
            "ferrymq reload: no running ferrymq holds {}",
            config.data_dir.display()
        );
        return ExitCode::FAILURE;
    };
    match std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
    {
        Ok(status) if status.success() => {
            println!(
                "{}: ok; asked ferrymq (pid {pid}) to reload it",
                file.display()
            );
            ExitCode::SUCCESS
        }
        Ok(_) | Err(_) => {
            eprintln!("ferrymq reload: cannot signal pid {pid}");
            ExitCode::FAILURE
        }
    }
}

/// What a SIGHUP does with the config file: a file that does not pass
/// `check-config` is refused (every problem logged) and the running
/// config stays; a good one is put in force ([`ferrymq_bridge::Node::reload`]:
/// listeners, limits, storage policies, bridges, metrics, the files it
/// names; each part logged, and what needs a restart named) and sets the
/// log level.
async fn reload_config(
    path: &std::path::Path,
    node: &mut ferrymq_bridge::Node,
    log_level: &LogLevel,
) {
    let new = match Config::from_file(path) {
        Ok(new) => new,
        Err(errors) => {
            for error in &errors {
                tracing::warn!("reload refused: {}: {error}", path.display());
            }
            tracing::warn!("reload: the running config stays");
            return;
        }
    };
    let running_level = node.broker().handle().config().log.level.clone();
    if let Some(set) = log_level
        && new.log.level != running_level
    {
        match set(&new.log.level) {
            Ok(()) => tracing::info!(level = %new.log.level, "reload: log.level replaced"),
            Err(e) => tracing::warn!("reload: log.level: {e}"),
        }
    }
    let report = node.reload(new).await;
    if report.is_ok() {
        tracing::info!("reload: {} in force", path.display());
    } else {
        tracing::warn!(
            "reload: {} in force except the parts refused above",
            path.display()
        );
    }
}

/// How often free heap memory is handed back to the system.
const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

fn serve(config: Config, path: Option<PathBuf>, log_level: LogLevel) -> anyhow::Result<()> {
    // The allocator gives memory back after a burst (see
    // ferrymq_broker::memory): a fixed mmap threshold from the start, and
    // free pages returned every few seconds by a thread of its own, so the
    // heap walk never holds up a connection.
    ferrymq_broker::memory::configure();
    std::thread::Builder::new()
        .name("ferrymq-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_EVERY);
                ferrymq_broker::memory::trim();
            }
        })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Listened for before the start: a SIGHUP must never kill a node.
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate())?;
        let hangup = signal(SignalKind::hangup())?;
        let mut node = ferrymq_bridge::Node::start(config).await?;
        serve_signals(&mut node, term, hangup, path.as_deref(), &log_level).await;
        node.shutdown().await;
        Ok(())
    })
}

/// Waits for SIGINT or SIGTERM (then returns, to shut down); on each
/// SIGHUP reloads: the config file (`path`) read, checked and put in
/// force, or without one the password file, the ACL file and the
/// certificates read again (logged part by part; nothing is dropped).
async fn serve_signals(
    node: &mut ferrymq_bridge::Node,
    mut term: tokio::signal::unix::Signal,
    mut hangup: tokio::signal::unix::Signal,
    path: Option<&std::path::Path>,
    log_level: &LogLevel,
) {
    loop {
        // Cancel-safe: a signal that arrives while another branch runs
        // stays pending in its stream until the next loop.
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                tracing::info!("SIGINT received");
                return;
            }
            _ = term.recv() => {
                tracing::info!("SIGTERM received");
                return;
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP received: reloading");
                match path {
                    Some(path) => reload_config(path, node, log_level).await,
                    None => {
                        node.broker().reload();
                    }
                }
            }
        }
    }
}
