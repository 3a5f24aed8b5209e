//! Policies decided outside the write lock: the connection lent to their
//! history, the queries they made recorded, and the decision committed only
//! if every answer still holds (see the module above for the protocol).

use std::sync::{Arc, Mutex};

use super::history::summarize;
use super::{Audited, Conn, Ending, Engine, OPTIMISTIC_ATTEMPTS, SqlStore};
use crate::history::{History, HistoryError, HistoryScope};
use crate::policy::{SpendFilter, SpendSummary};
use crate::storage::{Decided, StorageError, Verdict};

/// A connection inside a transaction, which may be lent to the policies'
/// history for the time of their evaluation.
pub struct Lender<C> {
    conn: Option<C>,
}

impl<C> std::fmt::Debug for Lender<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lender").field("lent", &self.conn.is_none()).finish()
    }
}

impl<C: Conn + Send + 'static> Lender<C> {
    pub fn new(conn: C) -> Self {
        Lender { conn: Some(conn) }
    }

    /// The connection back, unless it was lost while lent.
    pub fn into_inner(mut self) -> Option<C> {
        self.conn.take()
    }

    /// The connection back with what the transaction's body returned; if
    /// the connection was lost while lent (the transaction abandoned, so
    /// rolled back), the body's error, or an error saying so.
    pub fn reclaim<T>(
        self,
        result: Result<T, StorageError>,
    ) -> Result<(C, Result<T, StorageError>), StorageError> {
        match self.into_inner() {
            Some(conn) => Ok((conn, result)),
            None => Err(result
                .err()
                .unwrap_or_else(|| StorageError::Invariant("the transaction's connection was lost".into()))),
        }
    }

    pub fn conn(&self) -> Result<&C, StorageError> {
        self.conn
            .as_ref()
            .ok_or_else(|| StorageError::Invariant("the transaction's connection was lost".into()))
    }

    /// Lend the connection, inside its transaction, to `f` as a history;
    /// take it back when `f` returns, with the queries `f` made.
    pub(super) fn lend<R>(
        &mut self,
        f: impl FnOnce(Arc<dyn History>) -> R,
    ) -> Result<(R, Vec<HistoryRead>), StorageError> {
        let history = Arc::new(LentHistory { conn: Mutex::new(self.conn.take()), reads: Mutex::default() });
        let result = f(history.clone());
        // Taken back even should a policy's host state still hold the
        // history: later queries through it find no connection.
        self.conn = history.conn.lock().unwrap_or_else(|p| p.into_inner()).take();
        let reads = std::mem::take(&mut *history.reads.lock().unwrap_or_else(|p| p.into_inner()));
        self.conn()?;
        Ok((result, reads))
    }
}

/// A history query a policy made, with the answer it got.
pub(super) type HistoryRead = (HistoryScope, SpendFilter, SpendSummary);

/// The policies' view of history during one evaluation: a connection inside
/// a transaction (a read snapshot, or the write-locked transaction that will
/// commit the decision), and a record of what was asked.
pub(super) struct LentHistory<C> {
    conn: Mutex<Option<C>>,
    reads: Mutex<Vec<HistoryRead>>,
}

impl<C: Conn + Send> History for LentHistory<C> {
    fn summarize(&self, scope: &HistoryScope, filter: &SpendFilter) -> Result<SpendSummary, HistoryError> {
        let guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        let conn = guard.as_ref().ok_or_else(|| HistoryError("the evaluation has ended".into()))?;
        let answer = summarize(conn, scope, filter).map_err(|e| HistoryError(e.to_string()))?;
        self.reads.lock().unwrap_or_else(|p| p.into_inner()).push((scope.clone(), filter.clone(), answer));
        Ok(answer)
    }
}

/// Whether every history query of an evaluation still has the answer it
/// had. Policies are deterministic (same request, config and answers, same
/// decision), so if so, evaluating again now would decide the same: the
/// decision may commit as if it had been made under this lock.
pub(super) fn still_true(conn: &dyn Conn, reads: &[HistoryRead]) -> Result<bool, StorageError> {
    for (scope, filter, answer) in reads {
        if summarize(conn, scope, filter)? != *answer {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a decision made on a snapshot may commit now: a deny always (it
/// moves no money, and stands as of its snapshot); anything else only if
/// every history query it made still has the same answer.
pub(super) fn stands(
    conn: &dyn Conn,
    decided: &Decided,
    reads: &[HistoryRead],
) -> Result<bool, StorageError> {
    Ok(matches!(decided.verdict, Verdict::Deny(_)) || still_true(conn, reads)?)
}

impl<E: Engine> SqlStore<E> {
    /// Decide on a snapshot and commit if the decision still stands; after
    /// [`OPTIMISTIC_ATTEMPTS`] conflicts, decide under the write lock.
    /// `check` runs first on the snapshot and again first in the write
    /// transaction: it may answer without deciding (a replay), refuse, or
    /// hand `decide` and `commit` what they work on. `check` and `commit`
    /// own what they use: the optimistic commit is a [`WriteJob`] for
    /// [`Engine::run`] (on SQLite, queued for the writer thread while other
    /// writes are under way).
    pub(super) fn decide_and_commit<S, T: Send + 'static>(
        &self,
        check: impl Fn(&dyn Conn) -> Result<Result<S, T>, StorageError> + Clone + Send + 'static,
        decide: &mut dyn FnMut(&S, Arc<dyn History>) -> Decided,
        commit: impl Fn(&dyn Conn, &S, Decided) -> Result<T, StorageError> + Clone + Send + 'static,
    ) -> Result<T, StorageError> {
        for _ in 0..OPTIMISTIC_ATTEMPTS {
            // Outside the write lock, on one snapshot: what the policies
            // decide, and every history query they made with its answer.
            let mut lender = Lender::new(self.engine.begin_read()?);
            let evaluated = match check(lender.conn()?) {
                Ok(Ok(subject)) => lender.lend(|history| decide(&subject, history)).map(Ok),
                Ok(Err(answer)) => Ok(Err(answer)),
                Err(e) => Err(e),
            };
            if let Some(conn) = lender.into_inner() {
                self.engine.end_read(conn);
            }
            let (decided, reads) = match evaluated? {
                Ok(evaluation) => evaluation,
                Err(answer) => return Ok(answer),
            };
            let (check, commit, audit_key) = (check.clone(), commit.clone(), self.key());
            let committed = self.engine.run(Box::new(move |lender| {
                let tx = &Audited { conn: lender.conn()?, key: audit_key.as_deref() };
                let subject = match check(tx)? {
                    Ok(subject) => subject,
                    Err(answer) => return Ok(Ending::Rollback(Some(answer))),
                };
                if !stands(tx, &decided, &reads)? {
                    return Ok(Ending::Rollback(None));
                }
                commit(tx, &subject, decided).map(|done| Ending::Commit(Some(done)))
            }))?;
            if let Some(done) = committed {
                return Ok(done);
            }
        }
        // Contended: evaluate under the write lock, where nothing can change.
        let key = self.audit_key.get().map(Arc::as_ref);
        self.engine.transaction(|lender| {
            let subject = match check(&Audited { conn: lender.conn()?, key })? {
                Ok(subject) => subject,
                Err(answer) => return Ok(Ending::Rollback(answer)),
            };
            let (decided, _) = lender.lend(|history| decide(&subject, history))?;
            commit(&Audited { conn: lender.conn()?, key }, &subject, decided).map(Ending::Commit)
        })
    }
}
