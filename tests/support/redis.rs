//! A `redis-server` on a free 127.0.0.1 port for the tests, stopped when dropped;
//! `scripts/test.sh` installs the program when it is missing.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use eshopbox_auth::store::RedisStore;

/// How long a `redis-server` may take to answer after it was started.
const START_LIMIT: Duration = Duration::from_secs(30);

/// A port on 127.0.0.1 that is free now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The process id of the server `client` reaches, if it answers.
fn server_pid(client: &redis::Client) -> Option<u32> {
    let mut connection = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    // Whatever else holds the port may never answer.
    connection
        .set_read_timeout(Some(Duration::from_secs(1)))
        .ok()?;
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query(&mut connection)
        .ok()?;
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))?
        .trim()
        .parse()
        .ok()
}

/// A `redis-server` on 127.0.0.1, stopped when dropped.
pub struct RedisServer {
    port: u16,
    child: Option<Child>,
    /// With TLS: the directory holding the CA and the server's certificate and key.
    tls: Option<std::path::PathBuf>,
}

impl RedisServer {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    pub fn start_with(tls: Option<std::path::PathBuf>) -> Self {
        let mut server = RedisServer {
            port: 0,
            child: None,
            tls,
        };
        // A port is free when picked, but `redis-server` binds it a moment later:
        // another test's server (or any socket) may take it meanwhile. Then this
        // server fails to start, and it is tried again on another port.
        for _ in 0..10 {
            server.port = free_port();
            if server.spawn() {
                return server;
            }
        }
        panic!("redis-server could not bind any of ten free ports");
    }

    /// Starts the server (again) on its port, and waits until it answers.
    pub fn restart(&mut self) {
        assert!(
            self.spawn(),
            "redis-server could not bind port {} again",
            self.port
        );
    }

    /// Starts the server on its port and waits until it answers; false if it exited
    /// (its port was taken).
    fn spawn(&mut self) -> bool {
        let port = self.port.to_string();
        let mut command =
            Command::new(std::env::var("REDIS_SERVER").unwrap_or("redis-server".into()));
        command
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null());
        match &self.tls {
            None => command.args(["--port", &port]),
            Some(dir) => command
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port,
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(dir.join("server.pem"))
                .arg("--tls-key-file")
                .arg(dir.join("server.key"))
                .arg("--tls-ca-cert-file")
                .arg(dir.join("ca.pem")),
        };
        let mut child = command
            .spawn()
            .expect("could not start redis-server: run the tests with scripts/test.sh, which installs it, or apt-get install -y redis-server");
        let pid = child.id();
        let client = self.client();
        // Generous: a loaded machine can take seconds to start a process.
        let deadline = Instant::now() + START_LIMIT;
        while Instant::now() < deadline {
            if child.try_wait().unwrap().is_some() {
                return false;
            }
            // The server that answers must be this one, not another test's that took
            // the port first.
            if server_pid(&client) == Some(pid) {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "redis-server did not answer on port {} within {START_LIMIT:?}",
            self.port
        );
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        match self.tls {
            None => format!("redis://127.0.0.1:{}/", self.port),
            Some(_) => format!("rediss://127.0.0.1:{}/", self.port),
        }
    }

    /// A client; with TLS, one that trusts the test CA.
    pub fn client(&self) -> redis::Client {
        match &self.tls {
            None => redis::Client::open(self.url()).unwrap(),
            Some(dir) => redis::Client::build_with_tls(
                self.url(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(std::fs::read(dir.join("ca.pem")).unwrap()),
                },
            )
            .unwrap(),
        }
    }

    /// A store of its own (its own connection), as another process would have.
    pub fn store(&self) -> RedisStore {
        RedisStore::from_client(self.client()).key_prefix("test:")
    }

    /// The raw value of a key.
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        let mut connection = self.client().get_connection().unwrap();
        redis::cmd("GET").arg(key).query(&mut connection).unwrap()
    }

    /// Runs a command on a connection of its own.
    pub fn command(&self, command: &mut redis::Cmd) {
        let mut connection = self.client().get_connection().unwrap();
        command.query::<()>(&mut connection).unwrap();
    }

    /// The remaining life of a key in milliseconds (`PTTL`).
    pub fn pttl(&self, key: &str) -> i64 {
        let mut connection = self.client().get_connection().unwrap();
        redis::cmd("PTTL").arg(key).query(&mut connection).unwrap()
    }

    /// Replaces a key's value and keeps its TTL.
    pub fn replace(&self, key: &str, value: &[u8]) {
        self.command(redis::cmd("SET").arg(key).arg(value).arg("KEEPTTL"));
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
