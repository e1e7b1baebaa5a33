//! Each Envoy's files under `.e2e-logs/<test>/`: created fresh, described
//! when something fails, removed unless kept.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

use crate::repo_root;

/// One Envoy's files under `.e2e-logs/<test>/`.
pub(super) struct LogFiles {
    pub(super) dir: PathBuf,
    pub(super) config: PathBuf,
    pub(super) log: PathBuf,
    pub(super) stdout: PathBuf,
    pub(super) stderr: PathBuf,
    pub(super) admin_address: PathBuf,
    pub(super) base_id: PathBuf,
    pub(super) keep: bool,
    /// The files live in a directory the caller chose and keeps (the
    /// stack's): kept without a word when dropped.
    pub(super) caller_dir: bool,
}

impl LogFiles {
    /// Fresh files for `instance` of test `test_name` (leftovers removed).
    pub(super) fn create(test_name: &str, instance: &str) -> Result<Self> {
        let mut files = Self::create_in(&repo_root().join(".e2e-logs").join(test_name), instance)?;
        files.keep = std::env::var("SLUICE_KEEP_LOGS").is_ok_and(|v| v == "1");
        files.caller_dir = false;
        Ok(files)
    }

    /// Fresh files for `instance` in `dir`, kept (leftovers removed).
    pub(super) fn create_in(dir: &Path, instance: &str) -> Result<Self> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let files = Self {
            config: dir.join(format!("{instance}.yaml")),
            log: dir.join(format!("{instance}.log")),
            stdout: dir.join(format!("{instance}.stdout")),
            stderr: dir.join(format!("{instance}.stderr")),
            admin_address: dir.join(format!("{instance}.admin-address")),
            base_id: dir.join(format!("{instance}.base-id")),
            dir,
            keep: true,
            caller_dir: true,
        };
        // Leftovers of an earlier failed run.
        files.remove();
        Ok(files)
    }

    /// Every file, for removal.
    fn all(&self) -> [&Path; 6] {
        [
            &self.config,
            &self.log,
            &self.stdout,
            &self.stderr,
            &self.admin_address,
            &self.base_id,
        ]
    }

    /// Removes every file.
    fn remove(&self) {
        for path in self.all() {
            let _ = std::fs::remove_file(path);
        }
    }

    /// Envoy's log, stderr and stdout, each under a heading.
    pub(super) fn read_all(&self) -> String {
        let mut out = String::new();
        for (label, path) in [
            ("log", &self.log),
            ("stderr", &self.stderr),
            ("stdout", &self.stdout),
        ] {
            if let Ok(text) = std::fs::read_to_string(path) {
                if !text.is_empty() {
                    out.push_str(&format!("==> {label} ({}) <==\n", path.display()));
                    out.push_str(&text);
                    if !text.ends_with('\n') {
                        out.push('\n');
                    }
                }
            }
        }
        out
    }

    /// The log directory and the last lines of the log (for error messages).
    pub(super) fn describe(&self) -> String {
        let all = self.read_all();
        // Envoy's start-up banner (extension lists, header maps) is noise.
        let lines: Vec<&str> = all
            .lines()
            .filter(|l| !(l.contains("][info][main] [source/server/server.cc:")))
            .collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        format!(
            "Envoy files: {}\n--- last lines of Envoy's output ---\n{tail}",
            self.dir.display()
        )
    }
}

impl Drop for LogFiles {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.describe());
            return;
        }
        if self.keep {
            if !self.caller_dir {
                eprintln!("Envoy files kept in {}", self.dir.display());
            }
            return;
        }
        self.remove();
        // Only succeeds when no other instance left files there.
        let _ = std::fs::remove_dir(&self.dir);
        if let Some(parent) = self.dir.parent() {
            let _ = std::fs::remove_dir(parent);
        }
    }
}

/// `name` made safe for a file name.
pub(super) fn sanitize(name: &str) -> String {
    let cleaned: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let cleaned = cleaned.trim_matches('.').to_owned();
    if cleaned.is_empty() {
        "unnamed".to_owned()
    } else {
        cleaned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_sanitized() {
        assert_eq!(sanitize("a/b c"), "a_b_c");
        assert_eq!(sanitize(".."), "unnamed");
    }
}
