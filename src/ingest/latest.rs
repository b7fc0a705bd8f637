//! The newest sampled frame of a source, kept for viewers (the web page and
//! `GET /v1/sources/{name}/frame.jpg`) whether or not a model runs.
//!
//! The frame is copied from the sampling path at most every [`KEEP_EVERY`] (wall clock), so a
//! 30 fps source costs two copies a second, and encoded to JPEG only when someone asks for it
//! (once per kept frame, however many pages are open).

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::VideoFrame;

/// Shortest wall-clock interval between two kept frames. The page asks at most once a second,
/// so twice that rate keeps what it shows under a second old.
pub const KEEP_EVERY: Duration = Duration::from_millis(500);
/// JPEG quality of the viewer image: small and quick to encode; it is a preview.
const JPEG_QUALITY: u8 = 70;

/// A cheap handle (clone it freely) to one source's newest kept frame.
#[derive(Clone, Default)]
pub struct LatestSampled {
    inner: Arc<Mutex<Option<Kept>>>,
}

#[derive(Clone)]
struct Kept {
    frame: Arc<VideoFrame>,
    kept_at: Instant,
    jpeg: Arc<OnceLock<Option<Vec<u8>>>>,
}

/// A kept frame as a viewer gets it.
#[derive(Clone)]
pub struct SampledView {
    /// Media seconds of the frame.
    pub t: f64,
    frame: Arc<VideoFrame>,
    jpeg: Arc<OnceLock<Option<Vec<u8>>>>,
}

impl SampledView {
    /// The frame as JPEG, encoded on first call; None if the encoder refuses it.
    pub fn jpeg(&self) -> Option<Vec<u8>> {
        self.jpeg
            .get_or_init(|| encode_jpeg(&self.frame, JPEG_QUALITY))
            .clone()
    }
}

/// RGB24 to JPEG at `quality` (1..=100).
pub fn encode_jpeg(frame: &VideoFrame, quality: u8) -> Option<Vec<u8>> {
    use image::ImageEncoder;
    let mut buf = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut buf, quality)
        .write_image(
            &frame.rgb,
            frame.width,
            frame.height,
            image::ExtendedColorType::Rgb8,
        )
        .ok()?;
    Some(buf)
}

impl LatestSampled {
    /// Called for every sampled frame; copies it only when the kept one is old enough
    /// (the first frame is always kept).
    pub fn offer(&self, frame: &VideoFrame) {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let due = g.as_ref().is_none_or(|k| k.kept_at.elapsed() >= KEEP_EVERY);
        if due {
            *g = Some(Kept {
                frame: Arc::new(frame.clone()),
                kept_at: Instant::now(),
                jpeg: Arc::default(),
            });
        }
    }

    /// The newest kept frame, None before the first sampled frame.
    pub fn get(&self) -> Option<SampledView> {
        let g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.as_ref().map(|k| SampledView {
            t: k.frame.t,
            frame: Arc::clone(&k.frame),
            jpeg: Arc::clone(&k.jpeg),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(t: f64, shade: u8) -> VideoFrame {
        VideoFrame {
            t,
            width: 16,
            height: 8,
            rgb: vec![shade; 16 * 8 * 3],
            captured: Instant::now(),
        }
    }

    #[test]
    fn keeps_the_first_frame_then_at_most_every_interval() {
        let l = LatestSampled::default();
        assert!(l.get().is_none());
        l.offer(&frame(0.0, 10));
        l.offer(&frame(0.1, 20));
        let v = l.get().unwrap();
        assert_eq!(v.t, 0.0);
        let jpeg = v.jpeg().unwrap();
        let img = image::load_from_memory(&jpeg).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (16, 8));
        std::thread::sleep(KEEP_EVERY + Duration::from_millis(20));
        l.offer(&frame(0.9, 200));
        let v = l.get().unwrap();
        assert_eq!(v.t, 0.9);
        let img = image::load_from_memory(&v.jpeg().unwrap())
            .unwrap()
            .to_rgb8();
        assert!(img.get_pixel(3, 3).0[0] > 150);
    }
}
