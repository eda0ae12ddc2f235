//! What the fuzz targets share.
use splicer_proto::preamble::{Reader, Step};

/// Fed a byte at a time (a segment boundary after every byte), the reader
/// the listener uses must come to the same answer as when it gets all the
/// bytes at once: the same preamble, or a refusal. Where it still wants
/// more at the end (the listener then closes the connection on EOF), the
/// whole must not have been accepted either.
pub fn segmented<R: Reader>(mut fresh: impl FnMut() -> R, data: &[u8])
where
    R::Value: PartialEq + std::fmt::Debug,
    R::Error: std::fmt::Debug,
{
    let whole = fresh().step(data);
    let mut r = fresh();
    for k in 1..=data.len() {
        match r.step(&data[..k]) {
            Step::More => {}
            Step::Done(v, len) => {
                match &whole {
                    Step::Done(w, wl) => assert!(*w == v && *wl == len, "done after {k} bytes: {v:?} {len}, whole: {w:?} {wl}"),
                    other => panic!("done after {k} bytes one at a time, whole: {other:?}"),
                }
                return;
            }
            Step::Fail(e) => {
                assert!(matches!(whole, Step::Fail(_)), "failed after {k} bytes ({e:?}), whole: {whole:?}");
                return;
            }
        }
    }
    // Still wanting more at the end: the whole may say the same, or refuse
    // (a reader fed in pieces parses a head only when a line or the head
    // may have ended, so it can notice a bad field later), but never
    // accept.
    assert!(!matches!(whole, Step::Done(..)), "wanted more to the end, whole: {whole:?}");
}
