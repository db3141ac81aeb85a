//! Test stores on both backends: a SQLite file in a temporary folder, or a fresh database on
//! a real PostgreSQL server.
//!
//! The PostgreSQL server is started by the tests themselves from the machine's PostgreSQL
//! binaries (`/usr/lib/postgresql/<version>/bin`, or `initdb` on the `PATH`;
//! `campaigns/ci-setup.sh` installs them): `initdb -A trust` into a temporary folder, then
//! `pg_ctl start` on a free port of 127.0.0.1 with its socket in that folder. PostgreSQL
//! refuses to run as root, so when the tests run as root the folder is given to the
//! `postgres` user and the server runs as that user (`runuser`). One server serves the tests
//! of the test process, each test in its own database; it is stopped (`pg_ctl stop -m fast`)
//! and its folder removed when the process exits.
//!
//! With `BROADSIDE_PG_URL` set (`postgres://user:password@host:port/database`, a role that
//! may create databases) the tests use that server instead and start none. Without it and
//! without binaries, the PostgreSQL tests fail and say to run `campaigns/ci-setup.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::store::Store;

/// A role with a password, refused over TCP unless the password is right (the rest of the
/// server trusts every connection); for the authentication-failure test.
pub(crate) const PASSWORD_ROLE: (&str, &str) = ("broadside_pw", "Right-Password-1");

/// A store location that lives as long as this value.
pub(crate) struct TestStore {
    location: PathBuf,
    _guard: Guard,
}

enum Guard {
    Dir(#[allow(dead_code)] tempfile::TempDir),
    Pg(PgDatabase),
}

impl TestStore {
    /// A new SQLite file.
    pub(crate) fn sqlite() -> TestStore {
        let dir = tempfile::tempdir().expect("temporary folder");
        TestStore {
            location: dir.path().join("c.db"),
            _guard: Guard::Dir(dir),
        }
    }

    /// A new, empty PostgreSQL database.
    pub(crate) fn postgres() -> TestStore {
        let db = PgDatabase::create();
        TestStore {
            location: PathBuf::from(&db.url),
            _guard: Guard::Pg(db),
        }
    }

    /// A second, separate store of the same kind.
    pub(crate) fn another(&self) -> TestStore {
        match self._guard {
            Guard::Dir(_) => TestStore::sqlite(),
            Guard::Pg(_) => TestStore::postgres(),
        }
    }

    /// The location to open: a file path or a `postgres://` URL.
    pub(crate) fn path(&self) -> &Path {
        &self.location
    }

    /// Opens (and migrates) the store.
    pub(crate) fn open(&self) -> Store {
        Store::open(&self.location).unwrap_or_else(|e| panic!("opening the test store: {e}"))
    }

    /// The PostgreSQL server this store lives on (`None` for SQLite).
    pub(crate) fn pg_server(&self) -> Option<&PgServer> {
        match &self._guard {
            Guard::Pg(db) => Some(&db.server),
            Guard::Dir(_) => None,
        }
    }
}

/// Runs each named test function (taking a `&TestStore`) on a SQLite file (`sqlite::NAME`)
/// and on a PostgreSQL database (`postgres::NAME`).
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[test]
                fn $name() {
                    super::$name(&$crate::testing::TestStore::sqlite());
                }
            )*
        }
        mod postgres {
            $(
                #[test]
                fn $name() {
                    super::$name(&$crate::testing::TestStore::postgres());
                }
            )*
        }
    };
}
pub(crate) use on_both_backends;

/// A database of its own for one test, dropped afterwards.
struct PgDatabase {
    server: Arc<PgServer>,
    name: String,
    url: String,
}

impl PgDatabase {
    fn create() -> PgDatabase {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let server = PgServer::shared();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "broadside_test_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        server
            .admin()
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap_or_else(|e| panic!("creating test database {name}: {e:?}"));
        let url = with_database(&server.url, &name);
        PgDatabase { server, name, url }
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        // WITH (FORCE) ends connections a test left open (PostgreSQL 13 and later).
        let drop = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(e) = self.server.admin().batch_execute(&drop) {
            eprintln!("dropping test database {}: {e}", self.name);
        }
    }
}

/// `url` with its database name replaced by `name`.
pub(crate) fn with_database(url: &str, name: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let (head, rest) = url.split_at(start);
    let (authority, tail) = rest.split_at(rest.find(['/', '?']).unwrap_or(rest.len()));
    let query = tail.find('?').map_or("", |q| &tail[q..]);
    format!("{head}{authority}/{name}{query}")
}

static SHARED: Mutex<Option<Arc<PgServer>>> = Mutex::new(None);

extern "C" fn stop_shared_server() {
    // Every test has finished when the process exits: this is the last reference.
    let server = SHARED.lock().unwrap_or_else(|p| p.into_inner()).take();
    drop(server);
}

/// A running PostgreSQL server: one the tests started, or the one `BROADSIDE_PG_URL` names.
pub(crate) struct PgServer {
    /// An administrator's URL (to the `postgres` database).
    pub(crate) url: String,
    /// The server the tests started (`None` with `BROADSIDE_PG_URL`).
    own: Option<OwnServer>,
}

struct OwnServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    as_postgres: bool,
    port: u16,
}

impl PgServer {
    /// The server the tests share, started by the first one that asks; it is stopped when
    /// the test process exits (an `atexit` handler, since statics are never dropped).
    fn shared() -> Arc<PgServer> {
        let mut slot = SHARED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = slot.as_ref() {
            return s.clone();
        }
        let s = Arc::new(PgServer::start());
        *slot = Some(s.clone());
        // SAFETY: registers a plain `extern "C"` function without arguments.
        unsafe {
            libc::atexit(stop_shared_server);
        }
        s
    }

    /// A new connection to the administrator's database.
    pub(crate) fn admin(&self) -> postgres::Client {
        postgres::Client::connect(&self.url, postgres::NoTls)
            .unwrap_or_else(|e| panic!("connecting to the test server: {e:?}"))
    }

    /// The port of a server the tests started.
    pub(crate) fn own_port(&self) -> Option<u16> {
        self.own.as_ref().map(|o| o.port)
    }

    fn start() -> PgServer {
        if let Ok(url) = std::env::var("BROADSIDE_PG_URL") {
            if !url.trim().is_empty() {
                return PgServer {
                    url: url.trim().to_string(),
                    own: None,
                };
            }
        }
        let bin = postgres_bin().unwrap_or_else(|| {
            panic!(
                "no PostgreSQL server binaries (initdb, pg_ctl) in /usr/lib/postgresql/*/bin or \
                 on the PATH: run `bash campaigns/ci-setup.sh` (installs Debian's postgresql), or \
                 set BROADSIDE_PG_URL to a server the tests may create databases on"
            )
        });
        let as_postgres = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("broadside-pg-")
            .tempdir()
            .expect("temporary folder");
        let mut own = OwnServer {
            dir,
            bin,
            as_postgres,
            port: 0,
        };
        if as_postgres {
            let (uid, gid) = postgres_user();
            std::os::unix::fs::chown(own.dir.path(), Some(uid), Some(gid))
                .expect("giving the test server's folder to the postgres user");
        }
        let data = own.data();
        own.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-A",
                "trust",
                "-U",
                "postgres",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        // The password test's role must give its password over TCP; everyone else is trusted.
        let hba = data.join("pg_hba.conf");
        let trusted = std::fs::read_to_string(&hba).expect("reading pg_hba.conf");
        std::fs::write(
            &hba,
            format!(
                "host all {} 127.0.0.1/32 scram-sha-256\n{trusted}",
                PASSWORD_ROLE.0
            ),
        )
        .expect("writing pg_hba.conf");
        let deadline = Instant::now() + Duration::from_secs(60);
        for attempt in 0.. {
            own.port = free_port();
            let url = format!("postgres://postgres@127.0.0.1:{}/postgres", own.port);
            let options = format!(
                "-c listen_addresses=127.0.0.1 -c port={} -k {} -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200",
                own.port,
                path_str(own.dir.path())
            );
            let log = own.dir.path().join(format!("server-{attempt}.log"));
            own.run(
                "pg_ctl",
                &[
                    "-D",
                    path_str(&data),
                    "-l",
                    path_str(&log),
                    "-o",
                    &options,
                    "-W",
                    "start",
                ],
            );
            // Poll until the server accepts a connection, or its log says it stopped.
            loop {
                if let Ok(mut c) = postgres::Client::connect(&url, postgres::NoTls) {
                    c.batch_execute(&format!(
                        "CREATE ROLE {} LOGIN CREATEDB PASSWORD '{}'",
                        PASSWORD_ROLE.0, PASSWORD_ROLE.1
                    ))
                    .expect("creating the password role");
                    return PgServer {
                        url,
                        own: Some(own),
                    };
                }
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("could not create any TCP/IP sockets") {
                    break; // the port was taken meanwhile: try another one
                }
                // (A connection tried while the server starts is logged as a FATAL too.)
                if text
                    .lines()
                    .any(|l| l.contains("FATAL") && !l.contains("is starting up"))
                {
                    panic!("the test PostgreSQL server did not start:\n{text}");
                }
                if Instant::now() > deadline {
                    panic!("the test PostgreSQL server did not accept connections within 60 s:\n{text}");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if Instant::now() > deadline {
                panic!("the test PostgreSQL server found no free port");
            }
        }
        unreachable!()
    }
}

impl OwnServer {
    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Runs a PostgreSQL program (as the postgres user when we are root); panics with its
    /// output if it fails.
    fn run(&self, program: &str, args: &[&str]) -> String {
        let exe = self.bin.join(program);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        // The server inherits the working directory, which the postgres user may not read.
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .env("LC_ALL", "C")
            .output()
            .unwrap_or_else(|e| panic!("running {}: {e}", exe.display()));
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.status.success(),
            "{} {args:?} failed ({}):\n{text}",
            exe.display(),
            out.status
        );
        text
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(own) = &self.own {
            let data = own.data();
            let exe = own.bin.join("pg_ctl");
            let mut cmd = if own.as_postgres {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(&exe);
                c
            } else {
                Command::new(&exe)
            };
            let stopped = cmd
                .args(["-D", path_str(&data), "-m", "fast", "-w", "stop"])
                .current_dir(own.dir.path())
                .output();
            if !stopped.is_ok_and(|o| o.status.success()) {
                eprintln!(
                    "stopping the test PostgreSQL server in {} failed",
                    data.display()
                );
            }
        }
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

/// The folder of `initdb` and `pg_ctl`: the newest `/usr/lib/postgresql/<version>/bin`, or
/// the `PATH`.
fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            (bin.join("initdb").is_file() && bin.join("pg_ctl").is_file()).then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the process's effective user.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The `postgres` user's uid and gid.
fn postgres_user() -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, "postgres"])
            .output()
            .expect("running id");
        assert!(
            out.status.success(),
            "running as root needs a `postgres` user to run the test server as (campaigns/ci-setup.sh installs postgresql, which creates it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a numeric id")
    };
    (id("-u"), id("-g"))
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}
