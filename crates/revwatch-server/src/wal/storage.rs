//! The file operations the log and the database file go through, as a seam (in the style of
//! redb's `StorageBackend`): tests put a model of a disk that loses what was not synced at a
//! power loss (`sim.rs`) where the real file system is. [`Disk`] is the real one, a
//! zero-sized type the store is generic over, so it compiles to the plain `std::fs` calls.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// A file system, as far as the log and the database use one.
pub(crate) trait Storage: Clone + Send + Sync + 'static {
    /// An open file.
    type File: StorageFile;

    /// Creates `dir` and its missing parents.
    fn create_dir_all(&self, dir: &Path) -> io::Result<()>;
    /// The names of the entries in `dir`.
    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>>;
    /// The whole content of a file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Opens an existing file for reading and writing.
    fn open(&self, path: &Path) -> io::Result<Self::File>;
    /// Creates a file, or empties an existing one, for reading and writing.
    fn create(&self, path: &Path) -> io::Result<Self::File>;
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the entries of `dir` durable: files created in, renamed into or removed from
    /// it survive a power loss only after this.
    fn sync_dir(&self, dir: &Path) -> io::Result<()>;
    /// Opens (or creates) the redb database at `path`.
    fn database(
        &self,
        builder: &redb::Builder,
        path: &Path,
    ) -> Result<redb::Database, redb::DatabaseError>;
}

/// An open file of a [`Storage`].
pub(crate) trait StorageFile: Send + Sync + 'static {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: the content written so far is durable on return.
    fn sync_data(&self) -> io::Result<()>;
    /// `fsync`: content and metadata.
    fn sync_all(&self) -> io::Result<()>;
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Disk;

impl Storage for Disk {
    type File = File;

    fn create_dir_all(&self, dir: &Path) -> io::Result<()> {
        fs::create_dir_all(dir)
    }

    fn list(&self, dir: &Path) -> io::Result<Vec<OsString>> {
        fs::read_dir(dir)?
            .map(|entry| entry.map(|e| e.file_name()))
            .collect()
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn open(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).open(path)
    }

    fn create(&self, path: &Path) -> io::Result<File> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, dir: &Path) -> io::Result<()> {
        // The empty path is the parent of a relative name: the working directory.
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)?.sync_all()
    }

    fn database(
        &self,
        builder: &redb::Builder,
        path: &Path,
    ) -> Result<redb::Database, redb::DatabaseError> {
        builder.create(path)
    }
}

impl StorageFile for File {
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }

    fn sync_data(&self) -> io::Result<()> {
        File::sync_data(self)
    }

    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }
}
