//! `stack up` / `stack down` (`make stack-up`, `make stack-down`): the
//! stack of `envoy/compose.yaml` as local processes on loopback, left
//! running between the two commands. Builds nothing: the Makefile targets
//! build the filter, the quota server and the `upstreams` binary first.
//!
//! `up` starts `stack run` in the background and returns once it recorded
//! the stack (Envoy dies with its parent, so the processes need a parent
//! that stays); `run` owns every process until SIGTERM; `down` stops
//! exactly the recorded processes.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand, ValueEnum};
use sluice_e2e::stack::local::{self, LocalStack, Options, Store};
use sluice_e2e::stack::state::{state_path, StackState};
use sluice_e2e::target_dir;
use tokio::signal::unix::{signal, SignalKind};

/// How long `up` waits for the stack (two Envoys compiling the filter on a
/// loaded machine).
const UP_WITHIN: Duration = Duration::from_secs(180);

/// The Sluice stack as local processes.
#[derive(Parser)]
#[command(name = "stack")]
struct Args {
    #[command(subcommand)]
    command: Action,
    /// Logs, rendered configurations and the state file (default
    /// `<target>/stack`).
    #[arg(long, global = true)]
    dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Action {
    /// Starts the stack in the background, prints where everything
    /// listens, and returns.
    Up {
        /// Where the quota server keeps its counters.
        #[arg(long, value_enum, default_value = "memory", env = "STORE")]
        store: StoreArg,
    },
    /// Runs the stack in the foreground until SIGTERM or Ctrl-C.
    Run {
        #[arg(long, value_enum, default_value = "memory", env = "STORE")]
        store: StoreArg,
    },
    /// Stops exactly the processes `up` recorded.
    Down,
}

#[derive(Clone, Copy, ValueEnum)]
enum StoreArg {
    Memory,
    Redis,
}

impl StoreArg {
    fn name(self) -> &'static str {
        match self {
            StoreArg::Memory => "memory",
            StoreArg::Redis => "redis",
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let dir = args.dir.unwrap_or_else(|| target_dir().join("stack"));
    let result = match args.command {
        Action::Up { store } => up(&dir, store),
        Action::Run { store } => run(&dir, store),
        Action::Down => down(&dir),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stack: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn up(dir: &Path, store: StoreArg) -> Result<()> {
    if let Some(state) = StackState::read(dir)? {
        if !state.running().is_empty() {
            bail!(
                "a stack already runs from {} (make stack-down stops it):\n{}",
                dir.display(),
                state.description
            );
        }
        std::fs::remove_file(state_path(dir))?;
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join("stack.log");
    let output = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut runner = {
        use std::os::unix::process::CommandExt as _;
        Command::new(std::env::current_exe()?)
            .arg("--dir")
            .arg(dir)
            .args(["run", "--store", store.name()])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(output.try_clone()?)
            .stderr(output)
            .spawn()
            .context("starting `stack run`")?
    };
    let deadline = Instant::now() + UP_WITHIN;
    loop {
        if let Some(state) = StackState::read(dir)? {
            print!("{}", state.description);
            println!("  stop: make stack-down");
            return Ok(());
        }
        let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
        if let Some(status) = runner.try_wait()? {
            bail!("the stack did not start ({status}):\n{}", log_text());
        }
        if Instant::now() >= deadline {
            let _ = runner.kill();
            let _ = runner.wait();
            bail!("the stack was not up within {UP_WITHIN:?}:\n{}", log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run(dir: &Path, store: StoreArg) -> Result<()> {
    let mut options = Options::new(dir)?;
    options.store = match store {
        StoreArg::Memory => Store::Memory,
        StoreArg::Redis => Store::Redis,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let mut terminate = signal(SignalKind::terminate()).context("listening for SIGTERM")?;
        let stack = LocalStack::start(&options).await?;
        let mut state = stack.state()?;
        let example = stack.envoys[0].url("/api/items");
        state
            .description
            .push_str(&format!("  try: curl -i {example}\n"));
        state.write(dir)?;
        print!("{}", state.description);
        tokio::select! {
            _ = terminate.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        println!("stopping");
        drop(stack);
        Ok(())
    })
}

fn down(dir: &Path) -> Result<()> {
    match local::down(dir)? {
        Some(state) => {
            for process in &state.processes {
                println!("stopped {} (pid {})", process.name, process.pid);
            }
        }
        None => println!("no stack recorded in {}", dir.display()),
    }
    Ok(())
}
