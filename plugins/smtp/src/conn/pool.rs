//! A small pool of idle relay connections, and sending or checking through it.

use std::fmt;
use std::io;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use lettre::address::Envelope;
use lettre::transport::smtp::client::AsyncSmtpConnection;
use lettre::transport::smtp::commands::{Noop, Quit};
use lettre::transport::smtp::response::Response;
use tokio::sync::Semaphore;

use super::{Connector, SendError, stale_connection, timed, transact};

struct Idle {
    conn: AsyncSmtpConnection,
    since: Instant,
}

/// Up to `size` connections in use at once, and up to `size` idle ones kept for reuse.
pub(crate) struct Pool {
    idle: Mutex<Vec<Idle>>,
    slots: Semaphore,
    size: usize,
    idle_timeout: Duration,
    opened: AtomicU64,
}

impl fmt::Debug for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pool")
            .field("size", &self.size)
            .field("idle", &self.idle_count())
            .field("opened", &self.opened())
            .finish()
    }
}

impl Pool {
    pub(crate) fn new(size: usize, idle_timeout: Duration) -> Pool {
        let size = size.max(1);
        Pool {
            idle: Mutex::new(Vec::with_capacity(size)),
            slots: Semaphore::new(size),
            size,
            idle_timeout,
            opened: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn idle_count(&self) -> usize {
        self.lock().len()
    }

    /// Connections opened since start.
    pub(crate) fn opened(&self) -> u64 {
        self.opened.load(Ordering::Relaxed)
    }

    /// The most recently used idle connection that has not idled too long.
    fn take(&self) -> Option<AsyncSmtpConnection> {
        let mut idle = self.lock();
        let timeout = self.idle_timeout;
        // Relays close idle sessions (Postfix after 300 s); do not bet on old ones.
        idle.retain(|i| i.since.elapsed() < timeout);
        idle.pop().map(|i| i.conn)
    }

    fn put(&self, conn: AsyncSmtpConnection) {
        if conn.has_broken() {
            return;
        }
        let mut idle = self.lock();
        if idle.len() < self.size {
            idle.push(Idle {
                conn,
                since: Instant::now(),
            });
        }
    }
}

/// A connection taken from the pool or opened, with a slot held while in use.
pub(crate) struct Lease<'a> {
    pub conn: AsyncSmtpConnection,
    pub reused: bool,
    _slot: tokio::sync::SemaphorePermit<'a>,
}

impl Connector {
    /// Send on a pooled connection; a reused connection that turns out stale before the
    /// content went out is replaced once by a fresh one. Never sends the content twice.
    pub(crate) async fn send(
        &self,
        pool: &Pool,
        envelope: &Envelope,
        email: &[u8],
    ) -> Result<Response, SendError> {
        let mut lease = self.lease(pool).await?;
        let first = transact(&mut lease.conn, envelope, email, self.timeout).await;
        let failed = match first {
            Ok(response) => {
                pool.put(lease.conn);
                return Ok(response);
            }
            Err(failed) => failed,
        };
        let retry = lease.reused && stale_connection(&failed);
        self.discard(lease.conn, &failed.error).await;
        if !retry {
            return Err(failed.error);
        }
        tracing::debug!(error = %failed.error, "reused SMTP connection was stale; retrying on a new one");
        let mut conn = self.open_counted(pool).await?;
        match transact(&mut conn, envelope, email, self.timeout).await {
            Ok(response) => {
                pool.put(conn);
                Ok(response)
            }
            Err(failed) => {
                self.discard(conn, &failed.error).await;
                Err(failed.error)
            }
        }
    }

    /// `NOOP` on a pooled connection.
    pub(crate) async fn check(&self, pool: &Pool) -> Result<(), SendError> {
        let mut lease = self.lease(pool).await?;
        let noop = timed(self.timeout, "NOOP", lease.conn.command(Noop)).await;
        match noop {
            Ok(_) => {
                pool.put(lease.conn);
                Ok(())
            }
            Err(e) if lease.reused => {
                self.discard(lease.conn, &e).await;
                let mut conn = self.open_counted(pool).await?;
                timed(self.timeout, "NOOP", conn.command(Noop)).await?;
                pool.put(conn);
                Ok(())
            }
            Err(e) => {
                self.discard(lease.conn, &e).await;
                Err(e)
            }
        }
    }

    async fn lease<'a>(&self, pool: &'a Pool) -> Result<Lease<'a>, SendError> {
        // The semaphore is never closed; a closed one would only mean "no limit".
        let slot = pool
            .slots
            .acquire()
            .await
            .map_err(|_| SendError::Connect(io::Error::other("connection pool closed")))?;
        if let Some(conn) = pool.take() {
            return Ok(Lease {
                conn,
                reused: true,
                _slot: slot,
            });
        }
        let conn = self.open_counted(pool).await?;
        Ok(Lease {
            conn,
            reused: false,
            _slot: slot,
        })
    }

    async fn open_counted(&self, pool: &Pool) -> Result<AsyncSmtpConnection, SendError> {
        pool.opened.fetch_add(1, Ordering::Relaxed);
        self.open().await
    }

    /// Drop a connection that failed; say QUIT first only if the relay is still answering.
    async fn discard(&self, mut conn: AsyncSmtpConnection, error: &SendError) {
        let answering = matches!(error, SendError::Smtp(e) if e.status().is_some());
        if answering && !conn.has_broken() {
            let _ = tokio::time::timeout(self.timeout, conn.command(Quit)).await;
        }
    }
}
