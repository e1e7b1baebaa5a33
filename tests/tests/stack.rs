//! The stack (tests/src/stack/): `envoy/compose.yaml` checked statically
//! (no Docker engine here) against the files it names and the local stack,
//! and the local stack run for real (`stack up`, shared limits through both
//! Envoys, `stack down`).
//!
//! The run needs Envoy (`make setup`), the filter (`make wasm`), the
//! `sluice` binary (`cargo build -p sluice-quota-server`, or `SLUICE_BIN`)
//! and `redis-server`.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_norway::Value as Yaml;
use sluice_e2e::client::Client;
use sluice_e2e::stack::demo::leased_floor;
use sluice_e2e::stack::files;
use sluice_e2e::stack::local::ENVOY_NAMES;
use sluice_e2e::stack::state::{state_path, StackState};
use sluice_e2e::stack::topology::{
    render_compose_envoy, COMPOSE_ADMIN_PORT, COMPOSE_ENVOY_CONFIG, COMPOSE_LISTEN_PORT,
    COMPOSE_QUOTA_CONFIG, COMPOSE_QUOTA_HOST, COMPOSE_UPSTREAMS, COMPOSE_WASM_PATH,
};
use sluice_e2e::{repo_root, wasm_path};

/// `envoy/stack/envoy.yaml` is the template rendered for compose with the
/// stack's filter configuration. Regenerate it with `make envoy-yaml`.
#[test]
fn compose_envoy_config_is_rendered_from_template() {
    let rendered = render_compose_envoy().expect("rendering the compose Envoy config");
    let path = files::compose_envoy_path();
    if std::env::var("SLUICE_BLESS").is_ok_and(|v| v == "1") {
        std::fs::write(&path, &rendered).expect("writing envoy/stack/envoy.yaml");
        return;
    }
    let on_disk = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        on_disk == rendered,
        "{} is not the rendered template: run `make envoy-yaml`",
        path.display()
    );
}

/// Envoy accepts the compose Envoys' configuration (`--mode validate`
/// loads and configures the filter; host names are not resolved), with the
/// filter's container path pointed at the built filter.
#[tokio::test]
async fn compose_envoy_config_validates() {
    let wasm = wasm_path().unwrap_or_else(|e| panic!("{e:#}"));
    let config = std::fs::read_to_string(files::compose_envoy_path()).unwrap();
    assert!(config.contains(COMPOSE_WASM_PATH));
    let config = config.replace(COMPOSE_WASM_PATH, &wasm.display().to_string());
    let file = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
    std::fs::write(file.path(), config).unwrap();
    let (ok, output) = sluice_e2e::envoy::validate(file.path()).await.unwrap();
    assert!(ok, "envoy --mode validate:\n{output}");
}

/// The compose file, merge keys applied.
fn compose() -> Yaml {
    let text = std::fs::read_to_string(files::compose_path()).unwrap();
    let mut compose: Yaml = serde_norway::from_str(&text).unwrap();
    compose.apply_merge().unwrap();
    compose
}

fn strings(value: &Yaml) -> Vec<String> {
    value
        .as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A service's bind mounts: container path → host path (resolved against
/// the compose file's directory).
fn mounts(service: &Yaml) -> BTreeMap<String, PathBuf> {
    let base = files::compose_path().parent().unwrap().to_path_buf();
    strings(&service["volumes"])
        .iter()
        .filter(|v| v.starts_with('.') || v.starts_with('/'))
        .map(|v| {
            let parts: Vec<&str> = v.split(':').collect();
            (parts[1].to_owned(), normalize(&base.join(parts[0])))
        })
        .collect()
}

/// `a/b/../c` → `a/c` (the path need not exist).
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for part in path.components() {
        match part {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            other => out.push(other),
        }
    }
    out
}

/// The argument after `flag` in `command`.
fn arg_after(command: &[String], flag: &str) -> String {
    let at = command.iter().position(|a| a == flag);
    at.and_then(|i| command.get(i + 1))
        .unwrap_or_else(|| panic!("no {flag} in {command:?}"))
        .clone()
}

/// The container ports a service publishes.
fn container_ports(service: &Yaml) -> Vec<u16> {
    strings(&service["ports"])
        .iter()
        .map(|p| p.rsplit(':').next().unwrap().parse().unwrap())
        .collect()
}

/// The sources of a Dockerfile's `COPY` lines (not `--from` a stage) and
/// its stage names.
fn dockerfile(path: &Path) -> (Vec<String>, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut sources = Vec::new();
    let mut stages = Vec::new();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["FROM", .., "AS", stage] => stages.push((*stage).to_owned()),
            ["COPY", args @ ..] if !args.iter().any(|a| a.starts_with("--from")) => {
                let args: Vec<&str> = args
                    .iter()
                    .copied()
                    .filter(|a| !a.starts_with("--"))
                    .collect();
                sources.extend(args[..args.len() - 1].iter().map(|s| (*s).to_owned()));
            }
            _ => {}
        }
    }
    (sources, stages)
}

#[test]
fn compose_names_files_that_exist_and_agree_with_the_local_stack() {
    let compose = compose();
    let services = compose["services"].as_mapping().expect("services");
    let service = |name: &str| -> &Yaml {
        services
            .get(name)
            .unwrap_or_else(|| panic!("compose has no service {name}"))
    };
    let built_wasm =
        normalize(&repo_root().join("target/wasm32-wasip1/release/sluice_filter.wasm"));

    // Every build: its context, Dockerfile, target stage and COPY sources.
    let mut builds = 0;
    for (name, svc) in services {
        let name = name.as_str().unwrap();
        if let Some(build) = svc.get("build") {
            builds += 1;
            let base = files::compose_path().parent().unwrap().to_path_buf();
            let context = normalize(&base.join(build["context"].as_str().unwrap()));
            assert_eq!(
                context,
                normalize(&repo_root()),
                "{name}: the context is the repository"
            );
            let path = context.join(build["dockerfile"].as_str().unwrap());
            assert!(path.is_file(), "{name}: {} is missing", path.display());
            let (sources, stages) = dockerfile(&path);
            assert!(!sources.is_empty(), "{}: no COPY", path.display());
            for source in sources {
                assert!(
                    context.join(&source).exists(),
                    "{}: COPY {source}: not in the repository",
                    path.display()
                );
            }
            if let Some(target) = build.get("target").and_then(Yaml::as_str) {
                assert!(
                    stages.iter().any(|s| s == target),
                    "{name}: no stage {target}"
                );
            }
        }
        // Every bind mount exists, or is the filter `make wasm` builds.
        for (inside, host) in mounts(svc) {
            assert!(
                host.exists() || host == built_wasm,
                "{name}: mounts {} at {inside}, which does not exist",
                host.display()
            );
        }
    }
    assert_eq!(builds, 2, "the quota server and the upstreams are built");

    // The Envoys: the rendered config (the same template and filter JSON as
    // the local stack: see the other tests), the built filter, the ports.
    for name in ENVOY_NAMES {
        let envoy = service(name);
        let mounted = mounts(envoy);
        let command = strings(&envoy["command"]);
        assert_eq!(arg_after(&command, "-c"), COMPOSE_ENVOY_CONFIG);
        assert_eq!(mounted[COMPOSE_ENVOY_CONFIG], files::compose_envoy_path());
        assert_eq!(mounted[COMPOSE_WASM_PATH], built_wasm, "{name}: the filter");
        assert_eq!(
            container_ports(envoy),
            [COMPOSE_LISTEN_PORT, COMPOSE_ADMIN_PORT],
            "{name}"
        );
    }

    // The quota server: the stack's sluice.yaml, on its listen port, with
    // its Redis a service of this file, run with appendonly.
    let quota = service(COMPOSE_QUOTA_HOST);
    let command = strings(&quota["command"]);
    assert_eq!(arg_after(&command, "--config"), COMPOSE_QUOTA_CONFIG);
    assert_eq!(
        mounts(quota)[COMPOSE_QUOTA_CONFIG],
        files::quota_config_path()
    );
    let listen = files::quota_listen().unwrap();
    let port: u16 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert_eq!(container_ports(quota), [port]);
    let config: Yaml =
        serde_norway::from_str(&std::fs::read_to_string(files::quota_config_path()).unwrap())
            .unwrap();
    let redis_url = config["storage"]["redis"]["url"].as_str().unwrap();
    let redis_host = redis_url
        .trim_start_matches("redis://")
        .split(':')
        .next()
        .unwrap();
    let redis = service(redis_host);
    let redis_command = strings(&redis["command"]).join(" ");
    assert!(
        redis_command.contains("--appendonly yes"),
        "{redis_command}"
    );

    // The upstreams listen where the rendered config sends traffic.
    let (host, ports) = COMPOSE_UPSTREAMS;
    let command = strings(&service(host)["command"]);
    for (flag, port) in [
        ("--http", ports.http),
        ("--grpc", ports.grpc),
        ("--ws", ports.ws),
    ] {
        assert_eq!(arg_after(&command, flag), format!("0.0.0.0:{port}"));
    }
}

/// The Sluice plugin configuration and the cluster names of a rendered
/// Envoy configuration.
fn plugin_and_clusters(config: &str) -> (String, Vec<String>) {
    let yaml: Yaml = serde_norway::from_str(config).unwrap();
    let listener = &yaml["static_resources"]["listeners"][0];
    let hcm = &listener["filter_chains"][0]["filters"][0]["typed_config"];
    let wasm = &hcm["http_filters"][0]["typed_config"]["config"];
    let plugin = wasm["configuration"]["value"].as_str().unwrap().to_owned();
    let clusters = yaml["static_resources"]["clusters"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect();
    (plugin, clusters)
}

fn stack(dir: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stack"))
        .arg("--dir")
        .arg(dir)
        .args(args)
        .output()
        .expect("running the stack binary")
}

fn text(output: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Stops the stack in `dir` if a test fails half-way.
struct DownOnDrop<'a>(&'a Path);

impl Drop for DownOnDrop<'_> {
    fn drop(&mut self) {
        if state_path(self.0).exists() {
            let _ = stack(self.0, &["down"]);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stack_up_shares_limits_through_both_envoys_and_down_stops_its_processes() {
    wasm_path().unwrap_or_else(|e| panic!("{e:#}"));
    let dir = tempfile::Builder::new()
        .prefix("sluice-stack-")
        .tempdir()
        .unwrap();
    let dir = dir.path();
    let _guard = DownOnDrop(dir);

    let up = stack(dir, &["up", "--store", "redis"]);
    assert!(up.status.success(), "stack up: {}", text(&up));
    let state = StackState::read(dir).unwrap().expect("a state file");
    let names: Vec<&str> = state.processes.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "stack",
            "redis",
            "quota-server",
            "upstreams",
            "envoy-a",
            "envoy-b"
        ]
    );
    assert!(state.processes.iter().all(|p| p.is_running()), "{state:?}");
    let again = stack(dir, &["up"]);
    assert!(
        !again.status.success(),
        "a second stack up must refuse: {}",
        text(&again)
    );

    // The local Envoys run the compose Envoys' template and filter JSON.
    let filter = files::filter_config().unwrap();
    let compose = std::fs::read_to_string(files::compose_envoy_path()).unwrap();
    let (compose_plugin, compose_clusters) = plugin_and_clusters(&compose);
    for name in ENVOY_NAMES {
        let local = std::fs::read_to_string(dir.join(format!("{name}.yaml"))).unwrap();
        let (plugin, clusters) = plugin_and_clusters(&local);
        assert_eq!(
            plugin.trim(),
            filter.trim(),
            "{name}: the stack's filter.json"
        );
        assert_eq!(plugin, compose_plugin, "{name}");
        assert_eq!(clusters, compose_clusters, "{name}");
    }
    // Redis keeps an append-only file.
    let redis_files: Vec<String> = walk(&dir.join("redis"));
    assert!(
        redis_files.iter().any(|f| f.contains("appendonly")),
        "{redis_files:?}"
    );

    // One budget for both Envoys.
    let limit = files::quota_limits().unwrap()["api"];
    let mut statuses = Vec::new();
    for i in 0..limit + 6 {
        let envoy = state.envoys[(i % 2) as usize];
        let reply = Client::new(envoy).get("/api/items").await.unwrap();
        statuses.push(reply.status);
    }
    let allowed = statuses.iter().filter(|&&s| s == 200).count() as u64;
    let limited = statuses.iter().filter(|&&s| s == 429).count() as u64;
    assert_eq!(allowed + limited, limit + 6, "{statuses:?}");
    match files::max_lease(&filter, "api") {
        // Exact: the quota server decides each request.
        None => assert_eq!(allowed, limit, "{statuses:?}"),
        // Leased: never above the limit, at least the documented floor.
        Some(lease) => {
            let floor = leased_floor(limit, ENVOY_NAMES.len() as u64, lease);
            assert!(
                (floor..=limit).contains(&allowed),
                "{allowed} outside [{floor}, {limit}]: {statuses:?}"
            );
        }
    }

    let down = stack(dir, &["down"]);
    assert!(down.status.success(), "stack down: {}", text(&down));
    for process in &state.processes {
        assert!(!process.is_running(), "{} still runs", process.name);
    }
    assert!(!state_path(dir).exists(), "the state file is removed");
    let again = stack(dir, &["down"]);
    assert!(
        String::from_utf8_lossy(&again.stdout).contains("no stack"),
        "{}",
        text(&again)
    );
}

/// Every file path under `dir`.
fn walk(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path.display().to_string());
        }
    }
    out
}
