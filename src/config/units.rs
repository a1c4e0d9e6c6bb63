//! Human units in the config file: durations (`250ms`, `5s`, `1h30m`) and byte sizes
//! (`512`, `16k`, `10m`, `1g`; binary multiples).

use std::fmt;
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written as `250ms`, `5s`, `2m`, `1h`, `1h30m`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn get(self) -> Duration {
        self.0
    }
}

/// Written back the way it is read (`1h30m`), so `/status` round-trips through the parser.
impl serde::Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(
            &humantime::format_duration(self.0)
                .to_string()
                .replace(' ', ""),
        )
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Dur;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a duration such as 250ms, 5s, 1h or 1h30m")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Dur, E> {
                humantime::parse_duration(s.trim()).map(Dur).map_err(|_| {
                    E::custom(format!(
                        "`{s}` is not a duration; expected e.g. 250ms, 5s, 1h or 1h30m"
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Dur, E> {
                Err(E::custom("a duration needs a unit, e.g. 5s or 250ms"))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Dur, E> {
                Err(E::custom("a duration needs a unit, e.g. 5s or 250ms"))
            }
        }
        d.deserialize_any(V)
    }
}

/// A byte count written as a number or with a binary suffix: `512`, `16k`, `10m`, `1g`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn get(self) -> u64 {
        self.0
    }

    pub fn parse(s: &str) -> Option<ByteSize> {
        let s = s.trim();
        let lower = s.to_ascii_lowercase();
        let lower = lower.trim_end_matches("ib").trim_end_matches('b');
        let (digits, mult) = match lower.as_bytes().last()? {
            b'k' => (&lower[..lower.len() - 1], 1u64 << 10),
            b'm' => (&lower[..lower.len() - 1], 1 << 20),
            b'g' => (&lower[..lower.len() - 1], 1 << 30),
            _ => (lower, 1),
        };
        digits
            .trim()
            .parse::<u64>()
            .ok()?
            .checked_mul(mult)
            .map(ByteSize)
    }
}

impl serde::Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a size such as 512, 16k, 10m or 1g")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<ByteSize, E> {
                ByteSize::parse(s).ok_or_else(|| {
                    E::custom(format!(
                        "`{s}` is not a size; expected e.g. 512, 16k, 10m or 1g"
                    ))
                })
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(n))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<ByteSize, E> {
                u64::try_from(n)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_with_units() {
        let d: Dur = serde_yaml::from_str("250ms").unwrap();
        assert_eq!(d.get(), Duration::from_millis(250));
        let d: Dur = serde_yaml::from_str("1h30m").unwrap();
        assert_eq!(d.get(), Duration::from_secs(5400));
        let back: Dur = serde_yaml::from_str(&serde_yaml::to_string(&d).unwrap()).unwrap();
        assert_eq!(back, d, "Dur serializes the way it parses");
        let err = serde_yaml::from_str::<Dur>("5").unwrap_err().to_string();
        assert!(err.contains("needs a unit"), "{err}");
        assert!(serde_yaml::from_str::<Dur>("soon").is_err());
    }

    #[test]
    fn sizes_read_with_suffixes() {
        assert_eq!(ByteSize::parse("512"), Some(ByteSize(512)));
        assert_eq!(ByteSize::parse("16k"), Some(ByteSize(16384)));
        assert_eq!(ByteSize::parse("10MiB"), Some(ByteSize(10 << 20)));
        assert_eq!(ByteSize::parse("1g"), Some(ByteSize(1 << 30)));
        assert_eq!(ByteSize::parse("ten"), None);
        let s: ByteSize = serde_yaml::from_str("64").unwrap();
        assert_eq!(s.get(), 64);
    }
}
