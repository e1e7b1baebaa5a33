//! `make bench-playground`, in the browser: the time the page's own wasm
//! (target/playground/, built by `make playground-build`) takes in headless
//! Chromium to simulate the bench scenario's 1,000,000 requests
//! (`simulate_json`: traffic generated, simulated, the report serialised),
//! timed by the page's `performance.now()`. Three rounds; the fastest first.

use anyhow::{bail, Context as _, Result};
use sluice_e2e::browser::Browser;
use sluice_e2e::repo_root;
use sluice_playground::bench;

#[tokio::main]
async fn main() -> Result<()> {
    let page = repo_root().join("target/playground/index.html");
    let page = page
        .canonicalize()
        .with_context(|| format!("{}: run make playground-build", page.display()))?;
    let browser = Browser::start().await?;
    browser.open(&format!("file://{}", page.display())).await?;
    browser
        .until(
            "the engine to load",
            "return document.querySelector('#status[data-state=ready]') && true || null",
        )
        .await?;
    let traffic = serde_json::to_string(&bench::traffic())?;
    let script = format!(
        "const started = performance.now();
         const report = JSON.parse(wasm_bindgen.simulate_json({config}, {traffic}));
         return [performance.now() - started, report.total];",
        config = serde_json::to_string(bench::CONFIG)?,
        traffic = serde_json::to_string(&traffic)?,
    );
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let answer = browser.run(&script).await?;
        let (Some(ms), Some(total)) = (answer[0].as_f64(), answer[1].as_u64()) else {
            bail!("the page answered {answer}");
        };
        if total != bench::REQUESTS {
            bail!(
                "the page simulated {total} requests, not {}",
                bench::REQUESTS
            );
        }
        rounds.push(ms);
    }
    rounds.sort_by(f64::total_cmp);
    let shown: Vec<String> = rounds.iter().map(|ms| format!("{ms:.0} ms")).collect();
    println!(
        "browser (headless Chromium, the page's wasm): {} requests generated, simulated and reported in {} (rounds: {})",
        bench::REQUESTS,
        shown.first().map_or("?", String::as_str),
        shown.join(", ")
    );
    Ok(())
}
