//! Process-level helpers: the parent death signal, CPU pinning, CPU time
//! and termination.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};

/// Asks the kernel to SIGTERM the child when the thread that started it
/// ends, so a test binary killed mid-run (timeout, Ctrl-C) leaves no Envoy
/// behind. The harness starts Envoy from the thread that owns it (the test's
/// thread, or `block_on`'s), which outlives it.
pub fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: prctl(PR_SET_PDEATHSIG) is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the process `command` starts run on `cpus` only (threads inherit
/// it). CPUs that do not exist are ignored; an empty set leaves it as is.
pub fn pin_to_cpus(command: &mut Command, cpus: &[usize]) {
    use std::os::unix::process::CommandExt as _;
    let Some(set) = cpu_set(cpus) else {
        return;
    };
    // SAFETY: the closure only makes the async-signal-safe
    // sched_setaffinity system call on a set built before fork.
    unsafe {
        command.pre_exec(move || {
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// Makes the calling thread run on `cpus` only: threads and processes it
/// starts afterwards inherit it (a benchmark keeps its helpers off the
/// CPU it gives Envoy). CPUs that do not exist are ignored.
pub fn pin_this_thread(cpus: &[usize]) -> Result<()> {
    let Some(set) = cpu_set(cpus) else {
        return Ok(());
    };
    // SAFETY: sched_setaffinity on the calling thread (0) with a valid set.
    if unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) } != 0 {
        return Err(std::io::Error::last_os_error()).context("sched_setaffinity");
    }
    Ok(())
}

/// The CPU set of `cpus` that exist; `None` when none does.
fn cpu_set(cpus: &[usize]) -> Option<libc::cpu_set_t> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let mut any = false;
    for &cpu in cpus {
        if cpu < libc::CPU_SETSIZE as usize {
            // SAFETY: cpu is below CPU_SETSIZE.
            unsafe { libc::CPU_SET(cpu, &mut set) };
            any = true;
        }
    }
    any.then_some(set)
}

/// A process's CPU time (user + system) from `/proc/<pid>/stat`.
pub fn process_cpu_time(pid: u32) -> Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which is in parentheses).
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `after` starts at field 3.
    let ticks = |i: usize| -> Result<u64> {
        fields
            .get(i - 3)
            .ok_or_else(|| anyhow!("short /proc/{pid}/stat"))?
            .parse::<u64>()
            .context("parsing /proc stat")
    };
    let total = ticks(14)? + ticks(15)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as u64 } else { 100 };
    Ok(Duration::from_nanos(
        total.saturating_mul(1_000_000_000) / hz,
    ))
}

/// SIGTERM, up to 5 s for a clean exit (which flushes the log), then SIGKILL.
pub fn terminate(process: &mut Child) {
    if matches!(process.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = libc::pid_t::try_from(process.id()) {
        // SAFETY: plain kill(2) on our own child's pid, which has not been
        // reaped yet (try_wait above returned None), so it is not reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if matches!(process.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = process.kill();
    let _ = process.wait();
}
