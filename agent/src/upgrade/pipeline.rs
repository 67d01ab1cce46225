//! Layers unpacked while they download: the downloading thread hashes each layer's bytes and
//! passes them on to an unpacking thread, which applies the layers onto a staging directory in
//! manifest order (whiteouts act on what the earlier layers left). A later layer may download
//! while an earlier one is still being unpacked.
//!
//! Nothing unverified is used: the unpacker finishes a layer, and starts the next, only once
//! the downloader said that layer's bytes were all there and matched their digest; the staging
//! tree is handed to mkfs only after every layer was. When a download fails (a digest or size
//! mismatch, a broken connection) the staging tree is removed before the error is returned.

use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::JoinHandle;

use kairos_util::IoResultExt;

use super::UpgradeError;
use super::layer::{self, Applied, LayerError};
use super::oci::Blob;

/// Bytes passed to the unpacker at a time.
const CHUNK: usize = 1 << 20;
/// Chunks the downloader may be ahead of the unpacker (memory held: DEPTH × CHUNK).
const DEPTH: usize = 32;

enum Msg {
    Data(Vec<u8>),
    /// The current layer's bytes are complete and their digest matched.
    Verified,
}

/// One layer's bytes as they arrive; the end of the layer is its verification mark. A
/// downloader that stops before the mark makes the read fail, so the layer is never complete.
struct LayerReader<'a> {
    rx: &'a Receiver<Msg>,
    cur: Vec<u8>,
    pos: usize,
    verified: bool,
}

impl Read for LayerReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.pos < self.cur.len() {
                let n = out.len().min(self.cur.len() - self.pos);
                out[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
                self.pos += n;
                return Ok(n);
            }
            if self.verified {
                return Ok(0);
            }
            match self.rx.recv() {
                Ok(Msg::Data(d)) => {
                    self.cur = d;
                    self.pos = 0;
                }
                Ok(Msg::Verified) => self.verified = true,
                Err(_) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the download stopped before the layer's digest was verified",
                    ));
                }
            }
        }
    }
}

/// Applies `digests`' layers in order from `rx`; each is complete only at its mark.
fn unpack_all(
    staging: &Path,
    digests: &[String],
    rx: &Receiver<Msg>,
) -> Result<Vec<Applied>, LayerError> {
    let mut done = Vec::new();
    for digest in digests {
        let mut r = LayerReader {
            rx,
            cur: Vec::new(),
            pos: 0,
            verified: false,
        };
        let applied = layer::apply(staging, digest, &mut r)?;
        // What follows the tar's end (padding) up to the mark: the layer counts only once
        // the downloader verified it.
        io::copy(&mut r, &mut io::sink()).map_err(|err| LayerError::Tar {
            layer: digest.clone(),
            err,
        })?;
        done.push(applied);
    }
    Ok(done)
}

/// The unpacking thread and the channel to it.
struct Unpacker {
    tx: Option<SyncSender<Msg>>,
    buf: Vec<u8>,
    thread: Option<JoinHandle<Result<Vec<Applied>, LayerError>>>,
    staging: PathBuf,
}

impl Unpacker {
    fn start(staging: &Path, digests: Vec<String>) -> Unpacker {
        let (tx, rx) = sync_channel(DEPTH);
        let dir = staging.to_path_buf();
        let thread = std::thread::spawn(move || unpack_all(&dir, &digests, &rx));
        Unpacker {
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK),
            thread: Some(thread),
            staging: staging.to_path_buf(),
        }
    }

    fn send(&mut self, m: Msg) -> bool {
        self.tx.as_ref().is_some_and(|tx| tx.send(m).is_ok())
    }

    fn flush(&mut self) -> bool {
        if self.buf.is_empty() {
            return true;
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        self.send(Msg::Data(full))
    }

    /// Bytes of the current layer (not verified yet). False once the unpacker stopped (its
    /// error comes from [`Unpacker::join`]).
    fn feed(&mut self, mut data: &[u8]) -> bool {
        while !data.is_empty() {
            let n = data.len().min(CHUNK - self.buf.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == CHUNK && !self.flush() {
                return false;
            }
        }
        true
    }

    /// The current layer is complete and verified.
    fn verified(&mut self) -> bool {
        self.flush() && self.send(Msg::Verified)
    }

    /// Ends the input (a layer not marked verified by now never completes) and waits.
    fn join(&mut self) -> Result<Vec<Applied>, LayerError> {
        self.tx = None;
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(r)) => r,
            Some(Err(_)) | None => Err(LayerError::Tar {
                layer: String::new(),
                err: io::Error::other("the unpacking thread ended abnormally"),
            }),
        }
    }

    fn discard(&mut self) {
        let _ = self.join();
        let _ = std::fs::remove_dir_all(&self.staging);
    }
}

impl Drop for Unpacker {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.discard();
        }
    }
}

/// Where a layer's bytes go as they arrive.
pub type Sink<'a> = dyn FnMut(&[u8]) -> Result<(), UpgradeError> + 'a;
/// Streams layer `i` (`blob`) into the sink, verified: Ok only when the bytes matched.
pub type Fetch<'a> = dyn FnMut(usize, &Blob, &mut Sink<'_>) -> Result<(), UpgradeError> + 'a;

/// Calls `fetch(i, blob, sink)` for each layer in order; `fetch` passes the blob's bytes to
/// `sink` as they arrive and returns Ok only when they were complete and matched the blob's
/// digest and size. The layers are applied onto `staging` (created) meanwhile; on any error
/// the staging tree is removed. Returns what each layer did, in order.
pub fn unpack_streamed(
    layers: &[Blob],
    staging: &Path,
    fetch: &mut Fetch<'_>,
) -> Result<Vec<Applied>, UpgradeError> {
    std::fs::create_dir_all(staging).at(staging, "creating")?;
    let mut u = Unpacker::start(staging, layers.iter().map(|b| b.digest.clone()).collect());
    for (i, b) in layers.iter().enumerate() {
        // A layer the unpacker refused: the rest of the blob is still hashed, so a corrupted
        // download is reported as such rather than as the tar error it caused.
        let mut alive = true;
        let got = fetch(i, b, &mut |c| {
            if alive {
                alive = u.feed(c);
            }
            Ok(())
        });
        if let Err(e) = got {
            u.discard();
            return Err(e);
        }
        if !alive || !u.verified() {
            break;
        }
    }
    match u.join() {
        Ok(done) => Ok(done),
        Err(e) => {
            u.discard();
            Err(e.into())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upgrade::oci::{self, Verifier};

    fn tar_of(files: &[(&str, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, content) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(content.len() as u64);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            h.set_cksum();
            b.append_data(&mut h, name, content.as_bytes()).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn blob(bytes: &[u8]) -> Blob {
        Blob {
            digest: oci::sha256_digest(bytes),
            size: bytes.len() as u64,
            media_type: oci::MT_OCI_LAYER_GZIP.into(),
        }
    }

    /// A fetch that sends `data[i]` in small pieces through a verifier of `blobs[i]`.
    fn fetch_from(
        data: Vec<Vec<u8>>,
    ) -> impl FnMut(usize, &Blob, &mut Sink<'_>) -> Result<(), UpgradeError> {
        move |i, b, sink| {
            let mut v = Verifier::new("test-registry", "layer", b);
            for c in data[i].chunks(7) {
                v.update(c)?;
                sink(c)?;
            }
            v.finish()
        }
    }

    #[test]
    fn layers_are_applied_in_order_as_they_stream() {
        let t = tempfile::tempdir().unwrap();
        let staging = t.path().join("rootfs");
        let l1 = tar_of(&[("etc/a", "one"), ("etc/b", "lower")]);
        let l2 = tar_of(&[("etc/.wh.b", ""), ("etc/a", "two")]);
        let blobs = [blob(&l1), blob(&l2)];
        let done = unpack_streamed(&blobs, &staging, &mut fetch_from(vec![l1, l2])).unwrap();
        assert_eq!(done.len(), 2);
        assert_eq!(done[1].whiteouts, 1);
        assert_eq!(
            std::fs::read_to_string(staging.join("etc/a")).unwrap(),
            "two"
        );
        assert!(!staging.join("etc/b").exists());
    }

    #[test]
    fn a_layer_whose_digest_mismatches_leaves_nothing_behind() {
        let t = tempfile::tempdir().unwrap();
        let staging = t.path().join("rootfs");
        let good = tar_of(&[("etc/a", "one")]);
        let mut bad = tar_of(&[("etc/evil", "x")]);
        // Valid tar content under a digest of other bytes: fully unpackable, never verified.
        let b2 = blob(&tar_of(&[("etc/evil", "y")]));
        let e = unpack_streamed(
            &[blob(&good), b2.clone()],
            &staging,
            &mut fetch_from(vec![good, std::mem::take(&mut bad)]),
        )
        .unwrap_err();
        match e {
            UpgradeError::DigestMismatch { digest, origin, .. } => {
                assert_eq!(digest, b2.digest);
                assert_eq!(origin, "test-registry");
            }
            other => panic!("{other}"),
        }
        assert!(!staging.exists(), "the staging tree is left behind");
    }

    #[test]
    fn garbage_that_breaks_the_unpacker_is_reported_as_the_digest_mismatch() {
        let t = tempfile::tempdir().unwrap();
        let staging = t.path().join("rootfs");
        let b = blob(&tar_of(&[("etc/a", "one")]));
        let junk = vec![0x1f, 0x8b, 0xff, 0xff, 0, 1, 2, 3];
        let e = unpack_streamed(&[b], &staging, &mut fetch_from(vec![junk])).unwrap_err();
        assert!(matches!(e, UpgradeError::DigestMismatch { .. }), "{e}");
        assert!(!staging.exists());
    }

    #[test]
    fn a_layer_is_not_complete_until_it_is_verified() {
        let t = tempfile::tempdir().unwrap();
        let staging = t.path().join("rootfs");
        std::fs::create_dir_all(&staging).unwrap();
        let l = tar_of(&[("etc/a", "one")]);
        let mut u = Unpacker::start(&staging, vec![blob(&l).digest]);
        assert!(u.feed(&l));
        // All bytes in, no verification mark: the layer fails rather than completing.
        let e = u.join().unwrap_err();
        assert!(
            e.to_string()
                .contains("before the layer's digest was verified"),
            "{e}"
        );
        u.discard();
        assert!(!staging.exists());
    }

    #[test]
    fn a_verified_broken_layer_is_the_unpackers_error_and_is_removed() {
        let t = tempfile::tempdir().unwrap();
        let staging = t.path().join("rootfs");
        let junk = b"not a tar at all, but this is what the digest says".repeat(20);
        let e = unpack_streamed(
            &[blob(&junk)],
            &staging,
            &mut fetch_from(vec![junk.clone()]),
        )
        .unwrap_err();
        assert!(matches!(e, UpgradeError::Layer(_)), "{e}");
        assert!(!staging.exists());
    }
}
