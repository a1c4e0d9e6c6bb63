//! `${env:NAME}` and `${file:/path}` in any string value are replaced at load time, so secrets
//! stay out of the config file. A missing variable or unreadable file is a config error that
//! names the field, never the secret. File contents lose one trailing newline.

use serde_yaml::Value;

use super::error::{index, join, FieldError};

/// Expands references in every string of `value` (map keys are left alone).
pub fn expand(value: &mut Value, path: &str, errors: &mut Vec<FieldError>) {
    match value {
        Value::String(s) if s.contains("${") => match expand_str(s) {
            Ok(v) => *s = v,
            Err(msg) => errors.push(FieldError::new(path, msg)),
        },
        Value::Sequence(list) => {
            for (i, v) in list.iter_mut().enumerate() {
                expand(v, &index(path, i), errors);
            }
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let key = k.as_str().unwrap_or("?").to_string();
                expand(v, &join(path, &key), errors);
            }
        }
        Value::Tagged(t) => expand(&mut t.value, path, errors),
        _ => {}
    }
}

fn expand_str(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| "unclosed `${`; expected ${env:NAME} or ${file:PATH}".to_string())?;
        let reference = &after[..end];
        let value = if let Some(name) = reference.strip_prefix("env:") {
            std::env::var(name).map_err(|_| format!("environment variable `{name}` is not set"))?
        } else if let Some(file) = reference.strip_prefix("file:") {
            let mut v = std::fs::read_to_string(file)
                .map_err(|e| format!("cannot read secret file `{file}`: {e}"))?;
            if v.ends_with('\n') {
                v.pop();
                if v.ends_with('\r') {
                    v.pop();
                }
            }
            v
        } else {
            return Err(format!(
                "unknown reference `${{{reference}}}`; expected ${{env:NAME}} or ${{file:PATH}}"
            ));
        };
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_and_file_references_expand() {
        std::env::set_var("TOLLGATE_TEST_SECRET", "s3cret");
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let text = format!(
            "a: \"x-${{env:TOLLGATE_TEST_SECRET}}\"\nb: [\"${{file:{}}}\"]\n",
            file.display()
        );
        let mut v: Value = serde_yaml::from_str(&text).unwrap();
        let mut errs = Vec::new();
        expand(&mut v, "", &mut errs);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(v["a"].as_str(), Some("x-s3cret"));
        assert_eq!(v["b"][0].as_str(), Some("from-file"));
    }

    #[test]
    fn missing_references_name_the_field_not_the_value() {
        let mut v: Value =
            serde_yaml::from_str("k: { t: \"${env:TOLLGATE_SURELY_UNSET}\", u: \"${vault:x}\" }")
                .unwrap();
        let mut errs = Vec::new();
        expand(&mut v, "", &mut errs);
        assert_eq!(errs.len(), 2);
        assert_eq!(errs[0].path, "k.t");
        assert!(errs[0].message.contains("TOLLGATE_SURELY_UNSET"));
        assert!(errs[1].message.contains("unknown reference"));
    }
}
