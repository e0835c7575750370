//! A `redis-server` on a free 127.0.0.1 port for the tests, stopped when dropped;
//! `scripts/test.sh` installs the program when it is missing.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use eshopbox_auth::store::RedisStore;

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
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut server = RedisServer {
            port,
            child: None,
            tls,
        };
        server.restart();
        server
    }

    /// Starts the server (again) on its port, and waits until it answers.
    pub fn restart(&mut self) {
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
        let child = command
            .spawn()
            .expect("could not start redis-server: run the tests with scripts/test.sh, which installs it, or apt-get install -y redis-server");
        self.child = Some(child);
        let client = self.client();
        for _ in 0..500 {
            if let Ok(mut connection) = client.get_connection() {
                if redis::cmd("PING").query::<String>(&mut connection).is_ok() {
                    return;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("redis-server did not come up on port {}", self.port);
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
