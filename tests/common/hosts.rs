//! Test hosts on this machine (scripts/testhosts.sh): network namespaces on a bridge, each
//! with its own address and host name, and mpirun across them over TCP. Needs root and
//! iproute2; where those are missing the tests fail, saying so (CI runs as root).

use super::proc::{run_limited, Ran};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// Exit code of `testhosts.sh up` when the prefix or subnet is taken.
const IN_USE: i32 = 3;

pub struct TestHosts {
    pub prefix: String,
    pub subnet: String,
    pub n: usize,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/testhosts.sh")
}

impl TestHosts {
    /// `n` hosts on a prefix and subnet of their own: concurrent tests (and other users of
    /// the script) take others.
    pub fn up(n: usize, rate: &str) -> TestHosts {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let base = std::process::id() % 200;
        let mut last = String::new();
        for _ in 0..40 {
            let k = (base + NEXT.fetch_add(1, Ordering::SeqCst)) % 250 + 1;
            let hosts = TestHosts { prefix: format!("fbt{k}"), subnet: format!("10.214.{k}"), n };
            let ran = hosts.script(&["up", &n.to_string(), rate], Duration::from_secs(60));
            if ran.success() {
                return hosts;
            }
            last = ran.text();
            std::mem::forget(hosts); // not ours: nothing to tear down
            if ran.code() != Some(IN_USE) {
                break;
            }
        }
        panic!("cannot make {n} test hosts with scripts/testhosts.sh (these tests need root and iproute2):\n{last}");
    }

    fn script_command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(script());
        c.args(args).env("FB_HOSTS_PREFIX", &self.prefix).env("FB_HOSTS_SUBNET", &self.subnet);
        c
    }

    fn script(&self, args: &[&str], limit: Duration) -> Ran {
        run_limited(&self.script_command(args), limit)
    }

    /// The name of host `k` (1-based), as processes on it see their host name.
    pub fn host(&self, k: usize) -> String {
        format!("{}-h{k}", self.prefix)
    }

    /// mpirun on host 1 over hosts 1..=`hosts`, one rank per host in turn, TCP only; the
    /// ranks run `program args`. Run it with proc::run_limited or spawn_limited.
    pub fn mpirun(&self, np: usize, hosts: usize, env: &[(&str, &str)], program: &Path, args: &[&str]) -> Command {
        let flags = self.script(&["mpirun-args"], Duration::from_secs(10));
        assert!(flags.success(), "testhosts.sh mpirun-args: {}", flags.text());
        let list: Vec<String> = (1..=hosts).map(|k| self.host(k)).collect();
        let mut c = self.script_command(&["exec", "1", "mpirun"]);
        c.args(flags.stdout.split_whitespace());
        c.args(["--host", &list.join(","), "--map-by", "node", "--oversubscribe", "-np", &np.to_string()]);
        for (k, v) in env {
            c.args(["-x", &format!("{k}={v}")]);
        }
        c.arg(program).args(args);
        c.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        c
    }

    /// Take host `k`'s link down at the bridge, as a pulled cable would.
    pub fn cut(&self, k: usize) {
        let r = self.script(&["cut", &k.to_string()], Duration::from_secs(10));
        assert!(r.success(), "cut {k}: {}", r.text());
    }

    pub fn restore(&self, k: usize) {
        let r = self.script(&["restore", &k.to_string()], Duration::from_secs(10));
        assert!(r.success(), "restore {k}: {}", r.text());
    }
}

impl Drop for TestHosts {
    fn drop(&mut self) {
        let r = self.script(&["down"], Duration::from_secs(60));
        if !r.success() {
            eprintln!("testhosts.sh down ({}): {}", self.prefix, r.text());
        }
    }
}
