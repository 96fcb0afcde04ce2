//! A throwaway PostgreSQL server for tests: `initdb` in a temporary directory, `pg_ctl start`
//! on a free port of 127.0.0.1, stopped and removed when dropped. PostgreSQL refuses to run as
//! root, so under root the cluster belongs to the `postgres` user (its directory is handed to
//! it, and the programs run with its uid).

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A running PostgreSQL server.
pub struct Postgres {
    dir: PathBuf,
    bin: PathBuf,
    owner: Option<(u32, u32)>,
    /// Its port on 127.0.0.1.
    pub port: u16,
}

fn find_bin() -> PathBuf {
    if let Ok(dir) = std::env::var("ABIDE_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .filter(|b| b.join("initdb").exists())
        .unwrap_or_else(|| PathBuf::from("/usr/local/bin"))
}

fn postgres_user() -> Option<(u32, u32)> {
    let text = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = text.lines().find(|l| l.starts_with("postgres:"))?;
    let f: Vec<&str> = line.split(':').collect();
    Some((f.get(2)?.parse().ok()?, f.get(3)?.parse().ok()?))
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

impl Postgres {
    /// Starts a fresh server; panics with the server's own words when it cannot.
    pub fn start() -> Postgres {
        let bin = find_bin();
        let owner = if is_root() {
            Some(postgres_user().expect("running as root needs a `postgres` user for PostgreSQL"))
        } else {
            None
        };
        let dir = std::env::temp_dir().join(format!(
            "abide-pg-{}-{}",
            std::process::id(),
            crate::SplitMix(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
            )
            .next_u64()
        ));
        std::fs::create_dir_all(&dir).expect("a temporary directory");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).expect("chmod");
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).expect("chown to postgres");
        }
        let pg = |name: &str| {
            let mut c = Command::new(bin.join(name));
            if let Some((uid, gid)) = owner {
                c.uid(uid).gid(gid);
            }
            c.env_remove("PGDATA");
            c
        };
        let data = dir.join("data");
        let out = pg("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data)
            .output()
            .expect("initdb runs (PostgreSQL server binaries)");
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // A free port: bind port 0, note it, let it go; retried if the server loses the race.
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .expect("a free port")
                .port();
            let out = pg("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(dir.join("log"))
                .arg("-o")
                .arg(format!(
                    "-p {port} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200",
                    dir.display()
                ))
                .args(["-w", "-t", "60", "start"])
                .output()
                .expect("pg_ctl runs");
            if out.status.success() {
                return Postgres {
                    dir,
                    bin,
                    owner,
                    port,
                };
            }
        }
        panic!(
            "PostgreSQL did not start: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
    }

    /// A URL for the cluster's `postgres` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The server's data directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let mut c = Command::new(self.bin.join("pg_ctl"));
        if let Some((uid, gid)) = self.owner {
            c.uid(uid).gid(gid);
        }
        let _ = c
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
