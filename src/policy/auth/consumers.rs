//! `consumers.yaml` compiled: who the consumers are and how each credential finds its owner.
//! Built on every load, before the routes that refer to it; immutable once built.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::hmac::{HmacKeys, HmacSecret};
use super::jwks::JwksRegistry;
use super::jwt::{Claims, Issuer};
use super::key::ApiKeys;
use crate::config::{error, ConsumersFile, FieldError};

/// A consumer as requests see it.
#[derive(Debug)]
pub struct Consumer {
    pub name: String,
    pub tenant: Option<String>,
}

/// Which consumer a verified token of one issuer belongs to.
#[derive(Default)]
struct Members {
    by_subject: HashMap<String, Member>,
    any: Option<Member>,
}

#[derive(Clone, Copy)]
struct Member {
    consumer: usize,
    /// Index into `ConsumerTable::claim_names` of the claim holding the tenant.
    tenant_claim: Option<usize>,
}

#[derive(Default)]
pub struct ConsumerTable {
    /// Enabled consumers only: a disabled one simply has no credentials.
    pub consumers: Vec<Consumer>,
    pub api_keys: ApiKeys,
    pub hmac: HmacKeys,
    /// Client certificates by `ClientCert::fingerprint_key` / `common_name_key`.
    pub client_certs: HashMap<String, usize>,
    /// Issuers by their name in the file.
    pub issuers: HashMap<String, Arc<Issuer>>,
    members: HashMap<String, Members>,
    claim_names: Vec<String>,
    /// Files this table was read from (key and JWKS files), watched for changes.
    pub files: Vec<PathBuf>,
    /// Every issuer and consumer name the file declares (also broken or disabled ones), so
    /// routes' references are checked even when part of the file failed. Empty and unused
    /// (`declared_known` false) for a table that was not read from a file.
    pub declared_issuers: BTreeSet<String>,
    pub declared_consumers: BTreeSet<String>,
    pub declared_known: bool,
}

impl ConsumerTable {
    /// Compiles the parsed file: the table of what compiled, and the errors. `broken` names
    /// items that failed to parse (`consumers.x`, `jwt_issuers.y`): references to them are not
    /// reported again. A table with errors is only good for checking references.
    pub fn compile(
        file: &ConsumersFile,
        broken: &BTreeSet<String>,
        base_dir: &Path,
        jwks: &JwksRegistry,
    ) -> (ConsumerTable, Vec<FieldError>) {
        let mut errors = Vec::new();
        let mut table = ConsumerTable {
            declared_known: true,
            ..ConsumerTable::default()
        };
        for (name, set) in [
            ("jwt_issuers", &mut table.declared_issuers),
            ("consumers", &mut table.declared_consumers),
        ] {
            let prefix = format!("{name}.");
            set.extend(
                broken
                    .iter()
                    .filter_map(|b| b.strip_prefix(&prefix).map(str::to_string)),
            );
        }
        table
            .declared_issuers
            .extend(file.jwt_issuers.keys().cloned());
        table
            .declared_consumers
            .extend(file.consumers.keys().cloned());

        for (name, spec) in &file.jwt_issuers {
            let path = error::join("jwt_issuers", name);
            match Issuer::compile(&path, spec, base_dir, jwks) {
                Ok(issuer) => {
                    table.issuers.insert(name.clone(), Arc::new(issuer));
                }
                Err(e) => errors.extend(e),
            }
            table.files.extend(super::jwt::files_of(spec, base_dir));
        }

        // Credentials are unique across all consumers, enabled or not: a clash is a mistake
        // either way, and reporting it only once someone enables a consumer would be late.
        let mut key_owner: HashMap<[u8; 32], String> = HashMap::new();
        let mut access_key_owner: HashMap<&str, String> = HashMap::new();
        for (name, spec) in &file.consumers {
            let path = error::join("consumers", name);
            let index = table.consumers.len();
            if let Some(t) = &spec.tenant {
                if t.is_empty() || t.len() > 128 || !t.bytes().all(is_token_byte) {
                    errors.push(FieldError::new(
                        error::join(&path, "tenant"),
                        "a tenant is 1-128 characters of letters, digits and `-_.:`",
                    ));
                }
            }
            for (i, k) in spec.api_keys.iter().enumerate() {
                let kpath = error::join(&error::index(&error::join(&path, "api_keys"), i), "key");
                if k.key.len() < 16 {
                    errors.push(FieldError::new(
                        kpath,
                        "an API key must be at least 16 characters (guessable keys are no keys)",
                    ));
                    continue;
                }
                let digest = super::key::digest(k.key.as_bytes());
                if let Some(other) = key_owner.insert(digest, name.clone()) {
                    errors.push(FieldError::new(
                        kpath,
                        format!("this API key is also a key of consumer `{other}`"),
                    ));
                } else if spec.enabled && k.enabled {
                    table.api_keys.insert(digest, index);
                }
            }
            for (i, h) in spec.hmac.iter().enumerate() {
                let hpath = error::index(&error::join(&path, "hmac"), i);
                if h.access_key.is_empty() || !h.access_key.bytes().all(is_token_byte) {
                    errors.push(FieldError::new(
                        error::join(&hpath, "access_key"),
                        "an access key is letters, digits and `-_.:`",
                    ));
                    continue;
                }
                if h.secret.len() < 16 {
                    errors.push(FieldError::new(
                        error::join(&hpath, "secret"),
                        "an HMAC secret must be at least 16 bytes",
                    ));
                    continue;
                }
                if let Some(other) = access_key_owner.insert(&h.access_key, name.clone()) {
                    errors.push(FieldError::new(
                        error::join(&hpath, "access_key"),
                        format!(
                            "access key `{}` is also used by consumer `{other}`",
                            h.access_key
                        ),
                    ));
                } else if spec.enabled && h.enabled {
                    table.hmac.insert(
                        h.access_key.clone(),
                        HmacSecret {
                            consumer: index,
                            secret: h.secret.as_bytes().to_vec(),
                        },
                    );
                }
            }
            for (i, c) in spec.client_certs.iter().enumerate() {
                let cpath = error::index(&error::join(&path, "client_certs"), i);
                let key = match (&c.common_name, &c.fingerprint) {
                    (Some(cn), None) if !cn.is_empty() => {
                        crate::tls::ClientCert::key_for_common_name(cn)
                    }
                    (None, Some(fp)) => match crate::tls::ClientCert::key_for_fingerprint(fp) {
                        Some(k) => k,
                        None => {
                            errors.push(FieldError::new(
                                error::join(&cpath, "fingerprint"),
                                "expected a SHA-256 fingerprint: 64 hex digits, `:` separators allowed",
                            ));
                            continue;
                        }
                    },
                    _ => {
                        errors.push(FieldError::new(
                            cpath,
                            "set exactly one of `common_name` or `fingerprint`",
                        ));
                        continue;
                    }
                };
                if let Some(&other) = table.client_certs.get(&key) {
                    errors.push(FieldError::new(
                        cpath,
                        format!(
                            "this certificate is also a credential of consumer `{}`",
                            table.consumers[other].name
                        ),
                    ));
                } else if spec.enabled {
                    table.client_certs.insert(key, index);
                }
            }
            for (i, m) in spec.jwt.iter().enumerate() {
                let mpath = error::index(&error::join(&path, "jwt"), i);
                if !file.jwt_issuers.contains_key(&m.issuer)
                    && !broken.contains(&error::join("jwt_issuers", &m.issuer))
                {
                    errors.push(FieldError::new(
                        error::join(&mpath, "issuer"),
                        format!(
                            "unknown issuer `{}`; issuers in jwt_issuers: {}",
                            m.issuer,
                            names(file.jwt_issuers.keys())
                        ),
                    ));
                    continue;
                }
                if !spec.enabled {
                    continue;
                }
                let tenant_claim = m.tenant_claim.as_ref().map(|c| {
                    match table.claim_names.iter().position(|x| x == c) {
                        Some(p) => p,
                        None => {
                            table.claim_names.push(c.clone());
                            table.claim_names.len() - 1
                        }
                    }
                });
                let member = Member {
                    consumer: index,
                    tenant_claim,
                };
                let members = table.members.entry(m.issuer.clone()).or_default();
                let clash = match &m.subject {
                    Some(sub) => members.by_subject.insert(sub.clone(), member).is_some(),
                    None => members.any.replace(member).is_some(),
                };
                if clash {
                    errors.push(FieldError::new(
                        mpath,
                        match &m.subject {
                            Some(sub) => format!(
                                "subject `{sub}` of issuer `{}` already belongs to another consumer",
                                m.issuer
                            ),
                            None => format!(
                                "every token of issuer `{}` already belongs to another consumer",
                                m.issuer
                            ),
                        },
                    ));
                }
            }
            // A disabled consumer got no credentials above, so indexes stay aligned.
            if spec.enabled {
                table.consumers.push(Consumer {
                    name: name.clone(),
                    tenant: spec.tenant.clone(),
                });
            }
        }

        (table, errors)
    }

    /// The consumer index for a name (enabled consumers only).
    pub fn find(&self, name: &str) -> Option<usize> {
        self.consumers.iter().position(|c| c.name == name)
    }

    /// Who a verified token of issuer `issuer` (its name in the file) belongs to, and the
    /// tenant its claims name if the membership says so.
    pub fn token_owner(&self, issuer: &str, claims: &Claims) -> Option<(usize, Option<String>)> {
        let members = self.members.get(issuer)?;
        let member = claims
            .get("sub")
            .and_then(|s| s.as_str())
            .and_then(|sub| members.by_subject.get(sub))
            .or(members.any.as_ref())?;
        let tenant = member.tenant_claim.and_then(|c| {
            claims
                .get(&self.claim_names[c])
                .and_then(|v| v.as_str())
                .filter(|t| !t.is_empty() && t.len() <= 128 && t.bytes().all(is_token_byte))
                .map(str::to_string)
        });
        Some((member.consumer, tenant))
    }
}

/// Bytes allowed in names that travel in headers and logs (tenants, access keys).
pub fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':')
}

fn names<'a>(it: impl Iterator<Item = &'a String>) -> String {
    let v: Vec<&str> = it.map(String::as_str).collect();
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
