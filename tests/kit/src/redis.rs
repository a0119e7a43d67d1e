//! Real `redis-server` processes on free loopback ports, owned by a test: a single node, a
//! node that can be stopped, paused and started again on its port, and a 3-master Cluster
//! made with `redis-cli --cluster create`.
// A server that cannot start fails the test that asked for it, with the reason: panicking
// here is the test's failure, not a request path's.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A port free on 127.0.0.1 right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port whose cluster bus port (the port + 10000, which Redis Cluster also binds) is
/// free and in range.
fn free_cluster_port() -> u16 {
    for _ in 0..1000 {
        let port = free_port();
        if port <= 55_535 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free port pair for a cluster node");
}

fn redis_server() -> String {
    std::env::var("TOLLGATE_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into())
}

fn redis_cli() -> String {
    std::env::var("TOLLGATE_REDIS_CLI").unwrap_or_else(|_| "redis-cli".into())
}

/// One `redis-server`, killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
}

impl RedisServer {
    /// A node on a free port, no persistence.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A node with extra `redis-server` arguments (for example `--cluster-enabled yes`).
    pub fn start_with(extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("tollgate-redis-")
            .tempdir()
            .unwrap()
            .keep();
        let cluster = extra.contains(&"--cluster-enabled");
        let pick = || {
            if cluster {
                free_cluster_port()
            } else {
                free_port()
            }
        };
        let mut s = Self {
            child: None,
            port: pick(),
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        // A port found free can be taken by another process before Redis binds it: then Redis
        // exits at once, and another port is tried.
        for _ in 0..5 {
            if s.spawn() {
                return s;
            }
            s.port = pick();
        }
        panic!("redis-server did not start on 5 free ports in a row");
    }

    /// Starts the server on `self.port`; false if it exited at once (the port was taken).
    fn spawn(&mut self) -> bool {
        let child = Command::new(redis_server())
            .args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start redis-server (install Debian's redis-server; `make test` does): {e}"
                )
            });
        self.child = Some(child);
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if self
                .cli(&["PING"])
                .map(|o| o.trim() == "PONG")
                .unwrap_or(false)
            {
                return true;
            }
            if let Some(c) = self.child.as_mut()
                && c.try_wait().unwrap().is_some()
            {
                self.child = None;
                return false;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING within 10 s",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli` against this node; the output, or `None` if it failed.
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        let out = Command::new(redis_cli())
            .args(["-h", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .args(args)
            .stderr(Stdio::null())
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.pid().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} redis-server");
    }

    /// Kills the server (SIGKILL): connections drop, the port refuses.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, with its files (empty unless it was started with
    /// persistence, e.g. `--appendonly yes`).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "redis-server did not restart on port {}",
            self.port
        );
    }

    /// Freezes the process (SIGSTOP): connections stay open and nothing answers.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if self.child.is_some() {
            // A paused server would ignore SIGKILL's cleanup until resumed; resume first.
            let _ = Command::new("kill")
                .args(["-CONT", &self.pid().to_string()])
                .status();
        }
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three cluster-enabled masters joined by `redis-cli --cluster create`, slots spread.
#[derive(Debug)]
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Three masters with `extra` `redis-server` arguments each (for example persistence).
    pub fn start_with(extra: &[&str]) -> Self {
        let mut args = vec!["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
        args.extend_from_slice(extra);
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_with(&args)).collect();
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(RedisServer::addr));
        args.extend([
            "--cluster-replicas".into(),
            "0".into(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new(redis_cli())
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let cluster = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !cluster.nodes.iter().all(|n| {
            n.cli(&["CLUSTER", "INFO"])
                .is_some_and(|i| i.contains("cluster_state:ok"))
        }) {
            assert!(Instant::now() < deadline, "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The index in `nodes` of the master that serves the slot of hash tag `tag`.
    pub fn owner_of(&self, tag: &str) -> usize {
        let slot = self.nodes[0]
            .cli(&["CLUSTER", "KEYSLOT", tag])
            .and_then(|s| s.trim().parse::<u64>().ok())
            .expect("CLUSTER KEYSLOT");
        let slots = self.nodes[0]
            .cli(&["CLUSTER", "SLOTS"])
            .expect("CLUSTER SLOTS");
        // redis-cli prints each range as: start, end, then the master's ip and port (and id).
        let lines: Vec<&str> = slots.lines().map(str::trim).collect();
        for w in lines.windows(4) {
            if let (Ok(start), Ok(end), Ok(port)) = (
                w[0].parse::<u64>(),
                w[1].parse::<u64>(),
                w[3].parse::<u16>(),
            ) && w[2] == "127.0.0.1"
                && (start..=end).contains(&slot)
                && let Some(i) = self.nodes.iter().position(|n| n.port == port)
            {
                return i;
            }
        }
        panic!("no master serves slot {slot}: {slots}")
    }

    /// Keys stored on each node.
    pub fn keys_per_node(&self) -> Vec<u64> {
        self.nodes
            .iter()
            .map(|n| n.cli(&["DBSIZE"]).unwrap().trim().parse().unwrap())
            .collect()
    }
}
