//! Maintenance windows: on which days and between which local times a device may activate an
//! update and reboot. Pure: the caller converts `now` into the window's time zone (a civil
//! weekday and minute of the day, which is where daylight saving time is handled) and asks
//! [`Window::contains`].

/// A window: days of the week and a start and end time of day; an end before the start means
/// the window runs past midnight into the next day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Which days it opens on, Monday = 0.
    pub days: [bool; 7],
    /// Opening time, minutes after midnight.
    pub start: u16,
    /// Closing time, minutes after midnight.
    pub end: u16,
}

/// The day names a window uses.
pub const DAYS: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// Why a window was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WindowError {
    /// A day that is not `mon` … `sun`, or none at all.
    #[error("days {0:?}: expected some of mon, tue, wed, thu, fri, sat, sun")]
    Days(Vec<String>),
    /// A time that is not `HH:MM`.
    #[error("time {0:?}: expected HH:MM")]
    Time(String),
    /// The window opens and closes at the same time.
    #[error("the window opens and closes at the same time")]
    Empty,
}

fn minutes(t: &str) -> Result<u16, WindowError> {
    let bad = || WindowError::Time(t.to_owned());
    let (h, m) = t.split_once(':').ok_or_else(bad)?;
    if h.len() != 2 || m.len() != 2 {
        return Err(bad());
    }
    let (h, m): (u16, u16) = (h.parse().map_err(|_| bad())?, m.parse().map_err(|_| bad())?);
    if h > 23 || m > 59 {
        return Err(bad());
    }
    Ok(h * 60 + m)
}

impl Window {
    /// A window from day names and `HH:MM` times.
    pub fn parse(days: &[String], start: &str, end: &str) -> Result<Window, WindowError> {
        let mut set = [false; 7];
        if days.is_empty() {
            return Err(WindowError::Days(days.to_vec()));
        }
        for d in days {
            let i = DAYS
                .iter()
                .position(|n| n == d)
                .ok_or_else(|| WindowError::Days(days.to_vec()))?;
            set[i] = true;
        }
        let (start, end) = (minutes(start)?, minutes(end)?);
        if start == end {
            return Err(WindowError::Empty);
        }
        Ok(Window {
            days: set,
            start,
            end,
        })
    }

    /// Whether the window is open at local `weekday` (Monday = 0) and `minute` of the day.
    pub fn contains(&self, weekday: u8, minute: u16) -> bool {
        let day = usize::from(weekday % 7);
        let yesterday = (day + 6) % 7;
        if self.start < self.end {
            self.days[day] && (self.start..self.end).contains(&minute)
        } else {
            (self.days[day] && minute >= self.start) || (self.days[yesterday] && minute < self.end)
        }
    }
}
