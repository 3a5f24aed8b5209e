//! What crosses between the shared SQL and an engine: arguments, borrowed,
//! and rows, owned. Four kinds of value are enough for the schema (integers,
//! text, bytes, null); both engines map them onto their own types, and a
//! mismatch is an error, never a silent conversion.

use crate::storage::StorageError;

/// An argument bound to a `?N` placeholder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arg<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl From<i64> for Arg<'_> {
    fn from(v: i64) -> Self {
        Arg::Int(v)
    }
}

impl From<u32> for Arg<'_> {
    fn from(v: u32) -> Self {
        Arg::Int(i64::from(v))
    }
}

impl From<u16> for Arg<'_> {
    fn from(v: u16) -> Self {
        Arg::Int(i64::from(v))
    }
}

impl From<u8> for Arg<'_> {
    fn from(v: u8) -> Self {
        Arg::Int(i64::from(v))
    }
}

impl From<bool> for Arg<'_> {
    fn from(v: bool) -> Self {
        Arg::Int(i64::from(v))
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(v: &'a str) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a String> for Arg<'a> {
    fn from(v: &'a String) -> Self {
        Arg::Text(v)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(v: &'a [u8]) -> Self {
        Arg::Blob(v)
    }
}

impl<'a, T: Into<Arg<'a>>> From<Option<T>> for Arg<'a> {
    fn from(v: Option<T>) -> Self {
        v.map_or(Arg::Null, Into::into)
    }
}

impl<'a> From<&'a Option<String>> for Arg<'a> {
    fn from(v: &'a Option<String>) -> Self {
        v.as_deref().into()
    }
}

/// `args![a, b, c]`: a slice of [`Arg`]s.
macro_rules! args {
    ($($a:expr),* $(,)?) => { &[$($crate::storage::sql::Arg::from($a)),*][..] };
}
pub(crate) use args;

/// A value read from a row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    Int(i64),
    Text(String),
    Blob(Vec<u8>),
}

/// One row of a result, its columns in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row(pub Vec<Value>);

impl Row {
    /// Column `i` as `T`; a wrong type or a null where none may be is an
    /// error naming the column.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, StorageError> {
        let value = self.0.get(i).ok_or_else(|| StorageError::Database(format!("no column {i}")))?;
        T::from_value(value).ok_or_else(|| {
            StorageError::Database(format!(
                "column {i} holds {value:?}, not a {}",
                std::any::type_name::<T>()
            ))
        })
    }
}

/// A Rust type a column converts to.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Option<Self>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(i) => Some(*i),
            _ => None,
        }
    }
}

macro_rules! narrow_int {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Option<Self> {
                i64::from_value(v).and_then(|i| <$t>::try_from(i).ok())
            }
        }
    )*};
}
narrow_int!(u8, u16, u32, u64, usize);

impl FromValue for bool {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Int(0) => Some(false),
            Value::Int(1) => Some(true),
            _ => None,
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Text(s) => Some(s.clone()),
            _ => None,
        }
    }
}

impl FromValue for Vec<u8> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Blob(b) => Some(b.clone()),
            _ => None,
        }
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Option<Self> {
        match v {
            Value::Null => Some(None),
            v => T::from_value(v).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_convert_only_to_their_own_types() {
        let row =
            Row(vec![Value::Int(7), Value::Null, Value::Text("x".into()), Value::Int(-1), Value::Int(2)]);
        assert_eq!(row.get::<i64>(0).unwrap(), 7);
        assert_eq!(row.get::<u8>(0).unwrap(), 7);
        assert_eq!(row.get::<Option<String>>(1).unwrap(), None);
        assert_eq!(row.get::<Option<String>>(2).unwrap(), Some("x".into()));
        assert!(row.get::<String>(1).is_err(), "a null is not text");
        assert!(row.get::<i64>(2).is_err(), "text is not a number");
        assert!(row.get::<u32>(3).is_err(), "-1 is no u32");
        assert!(row.get::<bool>(4).is_err(), "2 is no boolean");
        assert!(row.get::<i64>(5).is_err(), "no such column");
        assert_eq!(
            args![1_i64, "a", None::<&str>, true],
            [Arg::Int(1), Arg::Text("a"), Arg::Null, Arg::Int(1)]
        );
    }
}
