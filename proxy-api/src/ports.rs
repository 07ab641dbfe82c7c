//! Port lists as operators write them in annotations and flags: `3306,25,4000-4010`.

use std::fmt;
use std::str::FromStr;

/// Why a port list does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PortSetError {
    #[error("{0:?} is not a port (1-65535) or a range of ports (4000-4010)")]
    Entry(String),
    #[error("the range {0:?} ends before it starts")]
    Backwards(String),
}

/// A set of ports: single ports and inclusive ranges, comma-separated (spaces allowed).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortSet(Vec<(u16, u16)>);

impl PortSet {
    pub fn contains(&self, port: u16) -> bool {
        self.0
            .iter()
            .any(|(low, high)| (*low..=*high).contains(&port))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn port(s: &str, entry: &str) -> Result<u16, PortSetError> {
    s.trim()
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| PortSetError::Entry(entry.to_owned()))
}

impl FromStr for PortSet {
    type Err = PortSetError;

    fn from_str(s: &str) -> Result<PortSet, PortSetError> {
        let mut ranges = Vec::new();
        for entry in s.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (low, high) = match entry.split_once('-') {
                Some((low, high)) => (port(low, entry)?, port(high, entry)?),
                None => {
                    let p = port(entry, entry)?;
                    (p, p)
                }
            };
            if high < low {
                return Err(PortSetError::Backwards(entry.to_owned()));
            }
            ranges.push((low, high));
        }
        Ok(PortSet(ranges))
    }
}

impl fmt::Display for PortSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let entries: Vec<String> = self
            .0
            .iter()
            .map(|(low, high)| {
                if low == high {
                    low.to_string()
                } else {
                    format!("{low}-{high}")
                }
            })
            .collect();
        f.write_str(&entries.join(","))
    }
}

impl serde::Serialize for PortSet {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_and_ranges_parse_and_bad_entries_are_named() {
        let set: PortSet = " 3306, 25,4000-4010 ".parse().unwrap();
        assert!(set.contains(3306) && set.contains(25) && set.contains(4005));
        assert!(!set.contains(4011) && !set.contains(80));
        assert_eq!(set.to_string(), "3306,25,4000-4010");
        assert!("".parse::<PortSet>().unwrap().is_empty());
        assert_eq!(
            "80,http".parse::<PortSet>(),
            Err(PortSetError::Entry("http".into()))
        );
        assert_eq!("0".parse::<PortSet>(), Err(PortSetError::Entry("0".into())));
        assert_eq!(
            "90-80".parse::<PortSet>(),
            Err(PortSetError::Backwards("90-80".into()))
        );
    }
}
