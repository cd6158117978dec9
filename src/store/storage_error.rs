//! redb's errors as our [`StorageError`], so `?` works on redb calls in the store while the
//! public API names no redb type.

use std::io;

use crate::error::{Error, StorageError, StorageErrorKind};

impl From<redb::Error> for StorageError {
    fn from(e: redb::Error) -> Self {
        let kind = match &e {
            redb::Error::Io(io) => io_kind(io),
            redb::Error::PreviousIo => StorageErrorKind::Io,
            redb::Error::Corrupted(_)
            | redb::Error::UpgradeRequired(_)
            | redb::Error::TableTypeMismatch { .. }
            | redb::Error::TypeDefinitionChanged { .. } => StorageErrorKind::Corrupt,
            redb::Error::DatabaseAlreadyOpen | redb::Error::LockProtocolMismatch => {
                StorageErrorKind::InUse
            }
            _ => StorageErrorKind::Other,
        };
        StorageError::new(kind, e)
    }
}

fn io_kind(e: &io::Error) -> StorageErrorKind {
    match e.kind() {
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded => StorageErrorKind::Full,
        _ => StorageErrorKind::Io,
    }
}

impl From<redb::Error> for Error {
    fn from(e: redb::Error) -> Self {
        Error::Storage(e.into())
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for Error {
            fn from(e: $t) -> Self {
                Error::Storage(redb::Error::from(e).into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_and_messages_come_from_redb() {
        let full = io::Error::new(io::ErrorKind::StorageFull, "no space");
        let e = StorageError::from(redb::Error::Io(full));
        assert_eq!(e.kind(), StorageErrorKind::Full);
        assert!(e.message().contains("no space"), "{e}");
        assert!(std::error::Error::source(&e).is_some());

        let e = StorageError::from(redb::Error::Corrupted("bad page".into()));
        assert_eq!(e.kind(), StorageErrorKind::Corrupt);
        assert_eq!(
            e.to_string(),
            redb::Error::Corrupted("bad page".into()).to_string()
        );

        let e = Error::from(redb::Error::PreviousIo);
        assert!(matches!(e, Error::Storage(ref s) if s.kind() == StorageErrorKind::Io));
        let e = Error::from(redb::Error::DatabaseAlreadyOpen);
        assert!(matches!(e, Error::Storage(ref s) if s.kind() == StorageErrorKind::InUse));
    }
}
