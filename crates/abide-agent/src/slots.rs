//! Writing components into slots: image files and block devices are written in place from
//! offset 0 through a large buffer and fsynced at the end. A slot is opened for writing only
//! once the engine made its group unbootable, and only ever in the target group (I1).

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use abide_boot::persist::IoError;

use crate::config::Slot;
use crate::error::Result;

/// How many bytes `slot` can hold: the file's length (an image file is never grown) or the
/// block device's size.
pub fn capacity(slot: &Slot) -> Result<u64> {
    let mut file = File::open(&slot.path).map_err(io("opening slot", &slot.path))?;
    let size = file
        .seek(SeekFrom::End(0))
        .map_err(io("measuring slot", &slot.path))?;
    Ok(size)
}

/// A slot open for writing.
pub struct SlotWriter {
    file: std::io::BufWriter<File>,
    path: std::path::PathBuf,
    written: u64,
}

impl SlotWriter {
    /// Opens `slot` for writing from its start.
    pub fn open(slot: &Slot) -> Result<SlotWriter> {
        let file = OpenOptions::new()
            .write(true)
            .open(&slot.path)
            .map_err(io("opening slot for writing", &slot.path))?;
        Ok(SlotWriter {
            file: std::io::BufWriter::with_capacity(4 << 20, file),
            path: slot.path.clone(),
            written: 0,
        })
    }

    /// Appends verified content.
    pub fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        let before = self.written;
        self.file.write_all(data)?;
        self.written += data.len() as u64;
        if before == 0 || before >> 20 != self.written >> 20 {
            abide_boot::crash::point("slot:write", "");
        }
        Ok(())
    }

    /// Flushes and fsyncs; returns the bytes written.
    pub fn finish(self) -> Result<u64> {
        let path = self.path.clone();
        let file = self.file.into_inner().map_err(|e| IoError {
            op: "writing slot",
            path: path.clone(),
            source: e.into_error(),
        })?;
        abide_boot::crash::point("slot:before-fsync", "");
        file.sync_all().map_err(io("fsync of slot", &path))?;
        abide_boot::crash::point("slot:after-fsync", "");
        Ok(self.written)
    }
}

fn io<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> IoError + 'a {
    move |source| IoError {
        op,
        path: path.to_owned(),
        source,
    }
}
