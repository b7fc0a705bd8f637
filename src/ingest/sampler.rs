//! Which decoded frames are analysed: one per `1/fps` grid interval of media time.

/// Picks frames at `fps` on a grid anchored at media time 0, from timestamps, never counts.
#[derive(Debug)]
pub struct Sampler {
    interval: f64,
    next_due: Option<f64>,
}

/// Timestamps within this of a grid point count as on it (rounding in containers).
const GRID_EPS: f64 = 0.002;

impl Sampler {
    pub fn new(fps: f64) -> Sampler {
        Sampler {
            interval: 1.0 / fps,
            next_due: None,
        }
    }

    pub fn admit(&mut self, t: f64) -> bool {
        if let Some(due) = self.next_due {
            if t + GRID_EPS < due {
                return false;
            }
        }
        self.next_due = Some((((t + GRID_EPS) / self.interval).floor() + 1.0) * self.interval);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampler_picks_one_frame_per_grid_interval() {
        let mut s = Sampler::new(1.0);
        let kept: Vec<f64> = (0..300)
            .map(|i| f64::from(i) / 30.0)
            .filter(|&t| s.admit(t))
            .collect();
        assert_eq!(kept.len(), 10);
        for (i, t) in kept.iter().enumerate() {
            assert!((t - i as f64).abs() < 0.04, "{kept:?}");
        }
        let mut s = Sampler::new(2.0);
        assert_eq!((0..60).filter(|&i| s.admit(f64::from(i) / 30.0)).count(), 4);
    }
}
