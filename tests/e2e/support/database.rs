//! The wallet's SQLite database read beside the running daemon: what a test
//! compares before and after something that must change nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use sha2::{Digest, Sha256};

/// The database as text, table by table: the schema (and `user_version`),
/// then each table's rows with their rowid, in rowid order. Read in one
/// transaction of a read-only connection beside the running daemon (WAL: it
/// sees every committed write). Long values stand as their length and hash.
pub(crate) fn db_dump(data: &Path) -> BTreeMap<String, String> {
    use rusqlite::OpenFlags;
    use rusqlite::types::ValueRef;
    let db =
        rusqlite::Connection::open_with_flags(data.join("spendguard.db"), OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("the database opens read-only beside the daemon");
    db.execute_batch("BEGIN").unwrap();
    let mut schema = String::new();
    let mut tables = Vec::new();
    let mut stmt =
        db.prepare("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name").unwrap();
    let mut rows = stmt.query([]).unwrap();
    while let Some(row) = rows.next().unwrap() {
        let (kind, name): (String, String) = (row.get(0).unwrap(), row.get(1).unwrap());
        let (table, sql): (String, Option<String>) = (row.get(2).unwrap(), row.get(3).unwrap());
        schema.push_str(&format!("{kind} {name} on {table}: {}\n", sql.unwrap_or_default()));
        if kind == "table" {
            tables.push(name);
        }
    }
    drop(rows);
    drop(stmt);
    let version: i64 = db.query_row("PRAGMA user_version", [], |r| r.get(0)).unwrap();
    schema.push_str(&format!("user_version {version}\n"));
    let mut dump = BTreeMap::from([("(schema)".to_owned(), schema)]);
    let long =
        |bytes: &[u8]| format!("({} bytes, sha256 {})", bytes.len(), hex::encode(Sha256::digest(bytes)));
    let cell = |v: ValueRef<'_>| match v {
        ValueRef::Null => "NULL".to_owned(),
        ValueRef::Integer(i) => i.to_string(),
        ValueRef::Real(f) => format!("{f:?}"),
        ValueRef::Text(t) if t.len() > 400 => format!("text {}", long(t)),
        ValueRef::Text(t) => format!("{:?}", String::from_utf8_lossy(t)),
        ValueRef::Blob(b) if b.len() > 64 => format!("blob {}", long(b)),
        ValueRef::Blob(b) => format!("x'{}'", hex::encode(b)),
    };
    for table in tables {
        let quoted = format!("\"{}\"", table.replace('"', "\"\""));
        // A WITHOUT ROWID table has no rowid: ordered by every column instead.
        let mut stmt = match db.prepare(&format!("SELECT rowid, * FROM {quoted} ORDER BY rowid")) {
            Ok(stmt) => stmt,
            Err(_) => {
                let n = db.prepare(&format!("SELECT * FROM {quoted}")).unwrap().column_count();
                let order: Vec<String> = (1..=n).map(|i| i.to_string()).collect();
                db.prepare(&format!("SELECT * FROM {quoted} ORDER BY {}", order.join(", "))).unwrap()
            }
        };
        let mut text = format!("({})\n", stmt.column_names().join(", "));
        let n = stmt.column_count();
        let mut rows = stmt.query([]).unwrap();
        while let Some(row) = rows.next().unwrap() {
            let cells: Vec<String> = (0..n).map(|i| cell(row.get_ref(i).unwrap())).collect();
            text.push_str(&cells.join(" | "));
            text.push('\n');
        }
        dump.insert(table, text);
    }
    dump
}

/// Which tables differ between two dumps, and their rows only in one or the
/// other; empty when none does.
pub(crate) fn db_diff(before: &BTreeMap<String, String>, after: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for table in before.keys().chain(after.keys()).collect::<BTreeSet<_>>() {
        let (b, a) =
            (before.get(table).map_or("", String::as_str), after.get(table).map_or("", String::as_str));
        if a == b {
            continue;
        }
        let (b, a): (BTreeSet<&str>, BTreeSet<&str>) = (b.lines().collect(), a.lines().collect());
        out.push_str(&format!("table `{table}` changed:\n"));
        for gone in b.difference(&a) {
            out.push_str(&format!("  - {gone}\n"));
        }
        for new in a.difference(&b) {
            out.push_str(&format!("  + {new}\n"));
        }
    }
    out
}
