//! SecLang directives → a [`Ruleset`]: rules with compiled operators, interned transformation
//! chains and TX slots, per-phase step lists with `skipAfter` jumps resolved.
//!
//! What the engine cannot run is reported, rule by rule, with the reason ([`Unsupported`]);
//! a rule with one part it cannot run is not run at all (running half a chain would change
//! its meaning). What cannot be parsed at all is an error naming file and line.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use super::macros::Expand;
use super::operator::{self, Cmp, Kind, Operator, Rx};
use super::prefilter::{self, Prefilter};
use super::request::{Processor, Var};
use super::seclang::{self, Directive, RawSelector, RawVariable, SyntaxError};
use super::transform::{ByteSet, Transform};
use crate::policy::client_ip::Cidr;

/// The compiled rule files, shared by every route (per-route settings live in `RouteWaf`).
#[derive(Debug)]
pub struct Ruleset {
    pub rules: Vec<Rule>,
    /// Phase 1 (request headers) and phase 2 (request body).
    pub phases: [Vec<Step>; 2],
    pub tx_names: Vec<String>,
    /// Slot by name (lowercase): macro-built names are looked up per request.
    tx_slots: HashMap<String, u16>,
    pub chains: Vec<Vec<Transform>>,
    /// Each chain as its longest proper prefix (another chain) plus its last transformation:
    /// chains share prefixes (`urlDecodeUni`, then `lowercase` or `htmlEntityDecode`, ...), and
    /// the cache computes each prefix of a value once. Chain 0 is the empty chain.
    pub chain_parent: Vec<(u16, Option<Transform>)>,
    /// Each chain's prefixes, shortest (the empty chain) first, itself last: the stages a
    /// `multiMatch` link tests.
    pub chain_stages: Vec<Vec<u16>>,
    /// Each chain's trigger bytes ([`Transform::triggers`] of all its transformations): a
    /// value holding none of them comes out unchanged. None when one always changes it.
    pub chain_triggers: Vec<Option<ByteSet>>,
    /// Rules not run, with the reason.
    pub unsupported: Vec<Unsupported>,
    /// Things run differently than ModSecurity would (directives ignored, ...), once each.
    pub notes: Vec<String>,
    /// Files read, in order.
    pub files: Vec<PathBuf>,
    /// TX:anomaly_score, which CRS adds every match to (reported with the outcome).
    pub score_slot: Option<u16>,
    /// Which rules can be ruled out per request by one regex set per value.
    pub prefilter: Prefilter,
}

impl Ruleset {
    /// The slot of a TX variable some rule names (names are case-insensitive).
    pub fn slot(&self, name: &[u8]) -> Option<usize> {
        let name = std::str::from_utf8(name).ok()?;
        let found = match name.bytes().any(|b| b.is_ascii_uppercase()) {
            true => self.tx_slots.get(&name.to_ascii_lowercase()),
            false => self.tx_slots.get(name),
        };
        found.map(|&s| s as usize)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Unsupported {
    pub id: Option<u32>,
    pub file: String,
    pub line: usize,
    pub reason: String,
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.id {
            Some(id) => write!(
                f,
                "rule {id} ({}:{}) not run: {}",
                self.file, self.line, self.reason
            ),
            None => write!(f, "{}:{}: not run: {}", self.file, self.line, self.reason),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Rule(u32),
    Marker,
}

#[derive(Debug)]
pub struct Rule {
    pub id: u32,
    pub file: String,
    pub line: usize,
    /// 1 or 2.
    pub phase: u8,
    pub links: Vec<Link>,
    pub tags: Vec<String>,
    pub msg: Option<Expand>,
    pub log: bool,
    pub disruptive: Disruptive,
    /// Step index in this rule's phase to continue at after a match (`skipAfter`).
    pub jump: Option<usize>,
    skip_after: Option<String>,
    /// `skip:N`.
    pub skip: usize,
    /// Reads and writes only TX: the same outcome for every request of a route, so it can run
    /// once at load (see `eval::start`).
    pub tx_only: bool,
}

#[derive(Debug)]
pub struct Link {
    pub targets: Vec<Target>,
    /// `!VAR:key` entries of the target list.
    pub excludes: Vec<Target>,
    pub op: Operator,
    /// Index into [`Ruleset::chains`].
    pub chain: u16,
    pub capture: bool,
    pub multi_match: bool,
    /// This link's `setvar`s and `ctl`s, run as soon as the link matches, before the next link
    /// is evaluated (libmodsecurity's order; CRS 920420 relies on it).
    pub effects: Vec<Effect>,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub var: Var,
    pub sel: Selector,
    pub count: bool,
}

#[derive(Debug, Clone)]
pub enum Selector {
    All,
    /// Lowercased; compared without case.
    Key(Vec<u8>),
    Regex(regex::bytes::Regex),
    TxSlot(u16),
    /// `TX:/regex/`, with the slots whose names it matches (names made by macros at run time
    /// are tested one by one).
    TxRegex(regex::bytes::Regex, Vec<u16>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disruptive {
    Pass,
    Deny,
    Allow,
}

#[derive(Debug)]
pub enum Effect {
    Set {
        name: TxName,
        value: Expand,
        how: Assign,
    },
    Unset(TxName),
    Ctl(Ctl),
}

#[derive(Debug, Clone)]
pub enum TxName {
    Slot(u16),
    Dynamic(Expand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Assign {
    Set,
    Add,
    Sub,
}

#[derive(Debug)]
pub enum Ctl {
    Engine(EngineCtl),
    RemoveById(u32, u32),
    RemoveByTag(String),
    RemoveTargetById(u32, u32, Target),
    RemoveTargetByTag(String, Target),
    ForceBody,
    BodyProcessor(Processor),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineCtl {
    On,
    Off,
    DetectionOnly,
}

/// Reads and compiles rule files (globs allowed in the file name), in order.
pub fn load(paths: &[String], base: &Path) -> Result<Ruleset, Vec<SyntaxError>> {
    let mut b = Builder::new();
    for p in paths {
        let path = base.join(p);
        let files = expand_glob(&path).map_err(|m| {
            vec![SyntaxError {
                file: path.clone(),
                line: 0,
                message: m,
            }]
        })?;
        for f in files {
            b.read_file(&f, 0)?;
        }
    }
    b.finish()
}

/// Compiles rules given as text (tests and benchmarks).
pub fn load_text(name: &str, text: &str) -> Result<Ruleset, Vec<SyntaxError>> {
    let mut b = Builder::new();
    let path = PathBuf::from(name);
    let d = seclang::parse(&path, text).map_err(|e| vec![e])?;
    b.files.push(path);
    b.directives(d, 0)?;
    b.finish()
}

/// `dir/REQUEST-*.conf`: `*` and `?` in the last component only, sorted; a path without
/// wildcards must exist.
fn expand_glob(path: &Path) -> Result<Vec<PathBuf>, String> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    if !name.contains(['*', '?']) {
        if !path.is_file() {
            return Err(format!("{}: no such file", path.display()));
        }
        return Ok(vec![path.to_path_buf()]);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut out: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| wildcard(&name, &e.file_name().to_string_lossy()))
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    if out.is_empty() {
        return Err(format!("{}: matches no file", path.display()));
    }
    Ok(out)
}

fn wildcard(pat: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pat.chars().collect(), s.chars().collect());
    fn go(p: &[char], s: &[char]) -> bool {
        match p.first() {
            None => s.is_empty(),
            Some('*') => (0..=s.len()).any(|i| go(&p[1..], &s[i..])),
            Some('?') => !s.is_empty() && go(&p[1..], &s[1..]),
            Some(c) => s.first() == Some(c) && go(&p[1..], &s[1..]),
        }
    }
    go(&p, &s)
}

#[derive(Default)]
struct Defaults {
    disruptive: Option<Disruptive>,
    log: Option<bool>,
}

enum Item {
    Rule(usize),
    Marker(String),
}

/// A rule being assembled, possibly across chained SecRule directives.
struct Pending {
    rule: Rule,
    /// The first reason a part cannot run; the rule is then reported instead of kept.
    broken: Option<String>,
    expects_link: bool,
}

#[derive(Default)]
struct Builder {
    rules: Vec<Rule>,
    items: Vec<Item>,
    tx: HashMap<String, u16>,
    tx_names: Vec<String>,
    chains: HashMap<Vec<Transform>, u16>,
    chain_parent: Vec<(u16, Option<Transform>)>,
    chain_list: Vec<Vec<Transform>>,
    defaults: [Defaults; 6],
    pending: Option<Pending>,
    ids: HashMap<u32, (String, usize)>,
    unsupported: Vec<Unsupported>,
    notes: Vec<String>,
    files: Vec<PathBuf>,
    /// SecRuleRemove*/SecRuleUpdateTarget*, applied to the rules defined before them.
    removals: Vec<(usize, Removal)>,
}

enum Removal {
    Ids(Vec<(u32, u32)>),
    Tag(String),
    TargetById(Vec<(u32, u32)>, Vec<Target>),
    TargetByTag(String, Vec<Target>),
}

impl Builder {
    /// TX slots 0..=9 are the captures (`TX:0` ... `TX:9`).
    fn new() -> Builder {
        let mut b = Builder::default();
        for i in 0..10 {
            b.intern_tx(&i.to_string());
        }
        b.intern_chain(Vec::new());
        b
    }

    fn note(&mut self, n: impl Into<String>) {
        let n = n.into();
        if !self.notes.contains(&n) {
            self.notes.push(n);
        }
    }

    fn intern_tx(&mut self, name: &str) -> u16 {
        let name = name.to_ascii_lowercase();
        if let Some(&s) = self.tx.get(&name) {
            return s;
        }
        let s = self.tx_names.len() as u16;
        self.tx_names.push(name.clone());
        self.tx.insert(name, s);
        s
    }

    fn intern_chain(&mut self, c: Vec<Transform>) -> u16 {
        if let Some(&i) = self.chains.get(&c) {
            return i;
        }
        let parent = match c.split_last() {
            Some((last, head)) => (self.intern_chain(head.to_vec()), Some(*last)),
            None => (0, None),
        };
        let i = self.chain_list.len() as u16;
        self.chain_list.push(c.clone());
        self.chain_parent.push(parent);
        self.chains.insert(c, i);
        i
    }

    fn expand(&mut self, s: &str) -> Result<Expand, String> {
        Expand::parse(s, &mut |n| self.intern_tx(n))
    }

    fn read_file(&mut self, path: &Path, depth: usize) -> Result<(), Vec<SyntaxError>> {
        let err = |m: String| {
            vec![SyntaxError {
                file: path.to_path_buf(),
                line: 0,
                message: m,
            }]
        };
        if depth > 8 {
            return Err(err("Include nested deeper than 8 files".into()));
        }
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let d = seclang::parse(path, &text).map_err(|e| vec![e])?;
        self.files.push(path.to_path_buf());
        self.directives(d, depth)
    }

    fn directives(&mut self, ds: Vec<Directive>, depth: usize) -> Result<(), Vec<SyntaxError>> {
        let mut errors = Vec::new();
        for d in ds {
            if let Err(m) = self.directive(&d, depth) {
                match m {
                    DirectiveError::Syntax(message) => errors.push(SyntaxError {
                        file: d.file.clone(),
                        line: d.line,
                        message,
                    }),
                    DirectiveError::Nested(mut e) => errors.append(&mut e),
                }
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn directive(&mut self, d: &Directive, depth: usize) -> Result<(), DirectiveError> {
        let name = d.name.to_ascii_lowercase();
        if self.pending.as_ref().is_some_and(|p| p.expects_link) && name != "secrule" {
            return Err(DirectiveError::Syntax(format!(
                "`{}` where the chained rule before expects another SecRule",
                d.name
            )));
        }
        let arg = |i: usize| d.args.get(i).map(String::as_str);
        match name.as_str() {
            "secrule" => {
                let (Some(vars), Some(op)) = (arg(0), arg(1)) else {
                    return Err(DirectiveError::Syntax(
                        "SecRule needs VARIABLES \"OPERATOR\" [\"ACTIONS\"]".into(),
                    ));
                };
                self.rule(d, Some((vars, op)), arg(2).unwrap_or(""))?;
            }
            "secaction" => self.rule(d, None, arg(0).unwrap_or(""))?,
            "secmarker" => {
                let m = arg(0)
                    .ok_or_else(|| DirectiveError::Syntax("SecMarker needs a name".into()))?;
                self.items.push(Item::Marker(m.to_string()));
            }
            "secdefaultaction" => {
                let acts =
                    seclang::split_actions(arg(0).unwrap_or("")).map_err(DirectiveError::Syntax)?;
                let mut phase = 2usize;
                let mut def = Defaults::default();
                for a in &acts {
                    match a.name.as_str() {
                        "phase" => {
                            phase = parse_phase(a.value.as_deref())
                                .map_err(DirectiveError::Syntax)?
                                as usize
                        }
                        "pass" => def.disruptive = Some(Disruptive::Pass),
                        "deny" | "drop" | "redirect" => def.disruptive = Some(Disruptive::Deny),
                        "log" => def.log = Some(true),
                        "nolog" => def.log = Some(false),
                        _ => {}
                    }
                }
                self.defaults[phase.min(5)] = def;
            }
            "include" => {
                let p =
                    arg(0).ok_or_else(|| DirectiveError::Syntax("Include needs a path".into()))?;
                let base = d.file.parent().unwrap_or(Path::new("."));
                let files = expand_glob(&base.join(p)).map_err(DirectiveError::Syntax)?;
                for f in files {
                    self.read_file(&f, depth + 1)
                        .map_err(DirectiveError::Nested)?;
                }
            }
            "secruleremovebyid" => {
                let ranges = d
                    .args
                    .iter()
                    .flat_map(|a| a.split([' ', ',']))
                    .filter(|a| !a.is_empty())
                    .map(id_range)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(DirectiveError::Syntax)?;
                self.removals.push((self.rules.len(), Removal::Ids(ranges)));
            }
            "secruleremovebytag" => {
                let tag = arg(0).unwrap_or("").to_string();
                self.removals.push((self.rules.len(), Removal::Tag(tag)));
            }
            "secruleupdatetargetbyid" | "secruleupdatetargetbytag" => {
                let (Some(sel), Some(vars)) = (arg(0), arg(1)) else {
                    return Err(DirectiveError::Syntax(format!(
                        "{} needs a rule and targets",
                        d.name
                    )));
                };
                let raw = seclang::split_variables(vars).map_err(DirectiveError::Syntax)?;
                if raw.iter().any(|v| !v.exclude) {
                    self.unsupported.push(Unsupported {
                        id: None,
                        file: d.file.display().to_string(),
                        line: d.line,
                        reason: format!("{}: only removing targets (`!VAR`) is supported", d.name),
                    });
                    return Ok(());
                }
                let targets = raw
                    .iter()
                    .map(|v| self.target(v))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(DirectiveError::Syntax)?;
                let r = if name == "secruleupdatetargetbyid" {
                    let ranges = sel
                        .split([' ', ','])
                        .filter(|a| !a.is_empty())
                        .map(id_range)
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(DirectiveError::Syntax)?;
                    Removal::TargetById(ranges, targets)
                } else {
                    Removal::TargetByTag(sel.to_string(), targets)
                };
                self.removals.push((self.rules.len(), r));
            }
            "seccomponentsignature"
            | "seccollectiontimeout"
            | "secruleengine"
            | "secrequestbodyaccess"
            | "secrequestbodylimit"
            | "secrequestbodynofileslimit"
            | "secrequestbodylimitaction"
            | "secrequestbodyinmemorylimit"
            | "secresponsebodyaccess"
            | "secresponsebodymimetype"
            | "secresponsebodylimit"
            | "secresponsebodylimitaction"
            | "secauditengine"
            | "secauditlog"
            | "secauditlogparts"
            | "secauditlogtype"
            | "secauditlogrelevantstatus"
            | "secauditlogstoragedir"
            | "secauditlogformat"
            | "secdebuglog"
            | "secdebugloglevel"
            | "sectmpdir"
            | "secdatadir"
            | "secargumentseparator"
            | "seccookieformat"
            | "secunicodemapfile"
            | "secpcrematchlimit"
            | "secpcrematchlimitrecursion"
            | "secstatusengine"
            | "secuploaddir"
            | "secuploadkeepfiles"
            | "secuploadfilemode"
            | "sectmpsaveuploadedfiles" => {
                if matches!(
                    name.as_str(),
                    "secruleengine" | "secrequestbodyaccess" | "secrequestbodylimit"
                ) {
                    self.note(format!(
                        "{} is ignored: the gateway's `waf` settings (mode, body_limit) decide",
                        d.name
                    ));
                }
            }
            _ => self.unsupported.push(Unsupported {
                id: None,
                file: d.file.display().to_string(),
                line: d.line,
                reason: format!("directive {} is not supported", d.name),
            }),
        }
        Ok(())
    }

    /// A SecRule (`Some((vars, op))`) or SecAction (`None`), a new rule or the next link of one.
    fn rule(
        &mut self,
        d: &Directive,
        var_op: Option<(&str, &str)>,
        actions: &str,
    ) -> Result<(), DirectiveError> {
        let syn = DirectiveError::Syntax;
        let acts = seclang::split_actions(actions).map_err(syn)?;
        let mut pending = match self.pending.take() {
            Some(p) => p,
            None => {
                let id = acts
                    .iter()
                    .find(|a| a.name == "id")
                    .and_then(|a| a.value.as_deref())
                    .ok_or_else(|| syn("a rule without an `id` action".into()))?;
                let id: u32 = id
                    .trim()
                    .parse()
                    .map_err(|_| syn(format!("rule id `{id}` is not a number")))?;
                if let Some((f, l)) = self.ids.get(&id) {
                    return Err(syn(format!("rule id {id} is already used at {f}:{l}")));
                }
                self.ids.insert(id, (d.file.display().to_string(), d.line));
                let mut phase = 2u8;
                for a in &acts {
                    if a.name == "phase" {
                        phase = parse_phase(a.value.as_deref()).map_err(syn)?;
                    }
                }
                let def = &self.defaults[phase as usize];
                Pending {
                    broken: (phase > 2).then(|| {
                        format!(
                            "phase {phase}: the gateway inspects requests only (phases 1 and 2)"
                        )
                    }),
                    rule: Rule {
                        id,
                        file: d.file.display().to_string(),
                        line: d.line,
                        phase: phase.max(1),
                        links: Vec::new(),
                        tags: Vec::new(),
                        msg: None,
                        log: def.log.unwrap_or(true),
                        disruptive: def.disruptive.unwrap_or(Disruptive::Pass),
                        jump: None,
                        skip_after: None,
                        skip: 0,
                        tx_only: false,
                    },
                    expects_link: false,
                }
            }
        };
        let first = pending.rule.links.is_empty();
        let mut chain = false;
        let mut transforms = Vec::new();
        let mut capture = false;
        let mut multi_match = false;
        let mut effects = Vec::new();
        for a in &acts {
            let v = a.value.as_deref().unwrap_or("");
            let r: Result<(), String> = (|| {
                match a.name.as_str() {
                    "id" | "phase" if !first => {
                        return Err(format!("`{}` on a chained rule", a.name))
                    }
                    "id"
                    | "phase"
                    | "ver"
                    | "rev"
                    | "severity"
                    | "accuracy"
                    | "maturity"
                    | "logdata"
                    | "auditlog"
                    | "noauditlog"
                    | "status"
                    | "sanitisearg"
                    | "sanitisematched"
                    | "sanitiserequestheader"
                    | "sanitisematchedbytes" => {}
                    "msg" => pending.rule.msg = Some(self.expand(v)?),
                    "tag" => pending.rule.tags.push(v.to_string()),
                    "log" => pending.rule.log = true,
                    "nolog" => pending.rule.log = false,
                    "chain" => chain = true,
                    "capture" => capture = true,
                    "multimatch" => multi_match = true,
                    "t" => {
                        if v.eq_ignore_ascii_case("none") {
                            transforms.clear();
                        } else {
                            match Transform::parse(v) {
                                Some(t) => transforms.push(t),
                                None => {
                                    pending.broken.get_or_insert(format!(
                                        "transformation t:{v} is not supported"
                                    ));
                                }
                            }
                        }
                    }
                    "pass" => pending.rule.disruptive = Disruptive::Pass,
                    "deny" | "drop" | "redirect" => pending.rule.disruptive = Disruptive::Deny,
                    "block" => {
                        let def = &self.defaults[pending.rule.phase as usize];
                        pending.rule.disruptive = def.disruptive.unwrap_or(Disruptive::Pass);
                    }
                    "allow" => pending.rule.disruptive = Disruptive::Allow,
                    "skipafter" => pending.rule.skip_after = Some(v.to_string()),
                    "skip" => {
                        pending.rule.skip = v
                            .trim()
                            .parse()
                            .map_err(|_| format!("skip:{v} is not a number"))?
                    }
                    "setvar" => {
                        if let Some(e) = self.setvar(v)? {
                            effects.push(e);
                        }
                    }
                    "ctl" => match self.ctl(v) {
                        Ok(Some(c)) => effects.push(Effect::Ctl(c)),
                        Ok(None) => {}
                        Err(reason) => {
                            pending.broken.get_or_insert(reason);
                        }
                    },
                    "initcol" | "expirevar" | "setuid" | "setsid" | "setrsc" | "deprecatevar" => {
                        self.note(format!(
                            "{}: persistent collections (IP, GLOBAL, SESSION, USER) hold nothing between requests",
                            a.name
                        ));
                    }
                    "setenv" => {}
                    "exec" | "proxy" | "prepend" | "append" => {
                        pending
                            .broken
                            .get_or_insert(format!("action {} is not supported", a.name));
                    }
                    other => return Err(format!("unknown action `{other}`")),
                }
                Ok(())
            })();
            r.map_err(syn)?;
        }
        let chain_id = self.intern_chain(transforms);
        let link = match var_op {
            None => Ok(Link {
                targets: vec![Target {
                    var: Var::RemoteAddr,
                    sel: Selector::All,
                    count: false,
                }],
                excludes: Vec::new(),
                op: Operator {
                    kind: Kind::Unconditional,
                    negated: false,
                },
                chain: chain_id,
                capture,
                multi_match,
                effects: Vec::new(),
            }),
            Some((vars, op)) => self.link(&d.file, vars, op, chain_id, capture, multi_match),
        };
        match link {
            Ok(mut l) => {
                l.effects = effects;
                pending.rule.links.push(l);
            }
            Err(LinkError::Syntax(m)) => return Err(syn(m)),
            Err(LinkError::Unsupported(m)) => {
                pending.broken.get_or_insert(m);
            }
        }
        pending.expects_link = chain;
        if chain {
            self.pending = Some(pending);
            return Ok(());
        }
        match pending.broken {
            Some(reason) => self.unsupported.push(Unsupported {
                id: Some(pending.rule.id),
                file: pending.rule.file.clone(),
                line: pending.rule.line,
                reason,
            }),
            None => {
                self.items.push(Item::Rule(self.rules.len()));
                self.rules.push(pending.rule);
            }
        }
        Ok(())
    }

    fn link(
        &mut self,
        file: &Path,
        vars: &str,
        op: &str,
        chain: u16,
        capture: bool,
        multi_match: bool,
    ) -> Result<Link, LinkError> {
        let raw = seclang::split_variables(vars).map_err(LinkError::Syntax)?;
        let mut targets = Vec::new();
        let mut excludes = Vec::new();
        for v in &raw {
            let t = self.target(v).map_err(LinkError::Unsupported)?;
            if t.var == Var::Xml {
                self.note("XML bodies are not parsed: XML:/* is empty");
            }
            if v.exclude {
                excludes.push(t);
            } else {
                targets.push(t);
            }
        }
        let op = self.operator(file, op)?;
        Ok(Link {
            targets,
            excludes,
            op,
            chain,
            capture,
            multi_match,
            effects: Vec::new(),
        })
    }

    fn target(&mut self, v: &RawVariable) -> Result<Target, String> {
        let var = Var::parse(&v.collection)
            .ok_or_else(|| format!("variable {} is not supported", v.collection))?;
        let sel = match (var, &v.selector) {
            (Var::Tx, Some(RawSelector::Key(k))) => Selector::TxSlot(self.intern_tx(k)),
            (_, raw) => selector(raw)?,
        };
        Ok(Target {
            var,
            sel,
            count: v.count,
        })
    }

    fn operator(&mut self, file: &Path, s: &str) -> Result<Operator, LinkError> {
        let (negated, s) = match s.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, s),
        };
        let (name, arg) = match s.strip_prefix('@') {
            Some(rest) => match rest.split_once(char::is_whitespace) {
                Some((n, a)) => (n.to_ascii_lowercase(), a.trim_start()),
                None => (rest.to_ascii_lowercase(), ""),
            },
            None => ("rx".to_string(), s),
        };
        let unsupported = |m: String| LinkError::Unsupported(m);
        let expand = |b: &mut Builder, a: &str| b.expand(a).map_err(LinkError::Syntax);
        let kind = match name.as_str() {
            "rx" => {
                if arg.contains("%{") {
                    Kind::RxDynamic(expand(self, arg)?, Default::default())
                } else {
                    let (rx, fancy) = Rx::compile(arg).map_err(unsupported)?;
                    if fancy {
                        self.note("some regexes need look-around or back-references and run on a backtracking engine (fancy-regex)");
                    }
                    Kind::Rx(rx)
                }
            }
            "pm" => operator::phrases(arg.split_whitespace().map(String::from))
                .map_err(LinkError::Syntax)?,
            "pmf" | "pmfromfile" => {
                let base = file.parent().unwrap_or(Path::new("."));
                let mut phrases = Vec::new();
                for f in arg.split_whitespace() {
                    if f.starts_with("http://") || f.starts_with("https://") {
                        return Err(unsupported(format!("@{name} from a URL")));
                    }
                    let text = std::fs::read_to_string(base.join(f))
                        .map_err(|e| LinkError::Syntax(format!("@{name} {f}: {e}")))?;
                    phrases.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(String::from),
                    );
                }
                operator::phrases(phrases).map_err(LinkError::Syntax)?
            }
            "streq" => Kind::StrEq(expand(self, arg)?),
            "contains" => Kind::Contains(expand(self, arg)?),
            "containsword" => Kind::ContainsWord(expand(self, arg)?),
            "beginswith" => Kind::BeginsWith(expand(self, arg)?),
            "endswith" => Kind::EndsWith(expand(self, arg)?),
            "within" => Kind::Within(expand(self, arg)?),
            "strmatch" => Kind::StrMatch(expand(self, arg)?),
            "eq" | "ne" | "gt" | "ge" | "lt" | "le" => {
                let cmp = match name.as_str() {
                    "eq" => Cmp::Eq,
                    "ne" => Cmp::Ne,
                    "gt" => Cmp::Gt,
                    "ge" => Cmp::Ge,
                    "lt" => Cmp::Lt,
                    _ => Cmp::Le,
                };
                Kind::Num(cmp, expand(self, arg)?)
            }
            "validatebyterange" => {
                Kind::ValidateByteRange(operator::byte_ranges(arg).map_err(LinkError::Syntax)?)
            }
            "validateurlencoding" => Kind::ValidateUrlEncoding,
            "validateutf8encoding" => Kind::ValidateUtf8,
            "detectsqli" => Kind::DetectSqli,
            "detectxss" => Kind::DetectXss,
            "ipmatch" | "ipmatchfromfile" | "ipmatchf" => {
                let text = if name == "ipmatch" {
                    arg.to_string()
                } else {
                    let base = file.parent().unwrap_or(Path::new("."));
                    std::fs::read_to_string(base.join(arg.trim()))
                        .map_err(|e| LinkError::Syntax(format!("@{name} {arg}: {e}")))?
                };
                let list = text
                    .split([',', '\n', ' '])
                    .map(str::trim)
                    .filter(|s| !s.is_empty() && !s.starts_with('#'))
                    .map(|s| Cidr::parse(s).map_err(|e| LinkError::Syntax(format!("@{name}: {e}"))))
                    .collect::<Result<Vec<_>, _>>()?;
                Kind::IpMatch(list)
            }
            "unconditionalmatch" => Kind::Unconditional,
            "nomatch" => Kind::NoMatch,
            other => return Err(unsupported(format!("operator @{other} is not supported"))),
        };
        Ok(Operator { kind, negated })
    }

    fn setvar(&mut self, v: &str) -> Result<Option<Effect>, String> {
        let (unset, v) = match v.strip_prefix('!') {
            Some(rest) => (true, rest),
            None => (false, v),
        };
        let (lhs, rhs) = match v.split_once('=') {
            Some((l, r)) => (l.trim(), Some(r)),
            None => (v.trim(), None),
        };
        let Some((coll, key)) = lhs.split_once('.') else {
            return Err(format!("setvar `{v}`: expected COLLECTION.name"));
        };
        if !coll.eq_ignore_ascii_case("tx") {
            self.note("setvar on persistent collections (IP, GLOBAL, SESSION, USER) does nothing between requests");
            return Ok(None);
        }
        let name = if key.contains("%{") {
            TxName::Dynamic(self.expand(&key.to_ascii_lowercase())?)
        } else {
            TxName::Slot(self.intern_tx(key))
        };
        if unset {
            return Ok(Some(Effect::Unset(name)));
        }
        let rhs = rhs.unwrap_or("1");
        let (how, value) = if let Some(r) = rhs.strip_prefix('+') {
            (Assign::Add, r)
        } else if let Some(r) = rhs.strip_prefix('-') {
            (Assign::Sub, r)
        } else {
            (Assign::Set, rhs)
        };
        Ok(Some(Effect::Set {
            name,
            value: self.expand(value)?,
            how,
        }))
    }

    fn ctl(&mut self, v: &str) -> Result<Option<Ctl>, String> {
        let (k, val) = v
            .split_once('=')
            .ok_or_else(|| format!("ctl:{v}: expected name=value"))?;
        let val = val.trim();
        let split_target = |val: &str| -> Result<(String, RawVariable), String> {
            let (sel, target) = val
                .split_once(';')
                .ok_or_else(|| format!("ctl:{k}={val}: expected RULE;TARGET"))?;
            let mut t = seclang::split_variables(target)?;
            if t.len() != 1 {
                return Err(format!("ctl:{k}={val}: expected one target"));
            }
            Ok((sel.trim().to_string(), t.remove(0)))
        };
        Ok(Some(match k.trim().to_ascii_lowercase().as_str() {
            "ruleengine" => Ctl::Engine(match val.to_ascii_lowercase().as_str() {
                "on" => EngineCtl::On,
                "off" => EngineCtl::Off,
                "detectiononly" => EngineCtl::DetectionOnly,
                _ => return Err(format!("ctl:ruleEngine={val}")),
            }),
            "ruleremovebyid" => {
                let (a, b) = id_range(val)?;
                Ctl::RemoveById(a, b)
            }
            "ruleremovebytag" => Ctl::RemoveByTag(val.to_string()),
            "ruleremovetargetbyid" => {
                let (sel, t) = split_target(val)?;
                let (a, b) = id_range(&sel)?;
                Ctl::RemoveTargetById(a, b, self.target(&t)?)
            }
            "ruleremovetargetbytag" => {
                let (sel, t) = split_target(val)?;
                Ctl::RemoveTargetByTag(sel, self.target(&t)?)
            }
            "forcerequestbodyvariable" => {
                if val.eq_ignore_ascii_case("on") {
                    Ctl::ForceBody
                } else {
                    return Ok(None);
                }
            }
            "requestbodyprocessor" => Ctl::BodyProcessor(match val.to_ascii_uppercase().as_str() {
                "URLENCODED" => Processor::UrlEncoded,
                "MULTIPART" => Processor::Multipart,
                "JSON" => Processor::Json,
                "XML" => Processor::Xml,
                _ => return Err(format!("ctl:requestBodyProcessor={val} is not supported")),
            }),
            "auditengine" | "auditlogparts" | "requestbodyaccess" | "debugloglevel"
            | "requestbodylimit" | "responsebodyaccess" => return Ok(None),
            other => return Err(format!("ctl:{other} is not supported")),
        }))
    }

    fn finish(mut self) -> Result<Ruleset, Vec<SyntaxError>> {
        if let Some(p) = self.pending.take() {
            return Err(vec![SyntaxError {
                file: PathBuf::from(&p.rule.file),
                line: p.rule.line,
                message: format!(
                    "rule {} ends with `chain` but no SecRule follows",
                    p.rule.id
                ),
            }]);
        }
        // Load-time removals: each applies to the rules defined before it.
        let mut removed = vec![false; self.rules.len()];
        for (upto, r) in std::mem::take(&mut self.removals) {
            for (i, rule) in self.rules.iter_mut().enumerate().take(upto) {
                let in_ranges =
                    |ranges: &[(u32, u32)]| ranges.iter().any(|&(a, b)| (a..=b).contains(&rule.id));
                match &r {
                    Removal::Ids(ranges) => removed[i] |= in_ranges(ranges),
                    Removal::Tag(t) => removed[i] |= rule.tags.contains(t),
                    Removal::TargetById(ranges, ts) if in_ranges(ranges) => {
                        for l in &mut rule.links {
                            l.excludes.extend(ts.iter().cloned());
                        }
                    }
                    Removal::TargetByTag(tag, ts) if rule.tags.contains(tag) => {
                        for l in &mut rule.links {
                            l.excludes.extend(ts.iter().cloned());
                        }
                    }
                    _ => {}
                }
            }
        }
        for rule in &mut self.rules {
            rule.tx_only = tx_only(rule);
        }
        let mut phases: [Vec<Step>; 2] = [Vec::new(), Vec::new()];
        let mut markers: [Vec<(usize, String)>; 2] = [Vec::new(), Vec::new()];
        let mut positions = vec![(0usize, 0usize); self.rules.len()];
        for item in &self.items {
            match item {
                Item::Rule(i) if !removed[*i] => {
                    let p = self.rules[*i].phase as usize - 1;
                    positions[*i] = (p, phases[p].len());
                    phases[p].push(Step::Rule(*i as u32));
                }
                Item::Rule(_) => {}
                Item::Marker(m) => {
                    for p in 0..2 {
                        markers[p].push((phases[p].len(), m.clone()));
                        phases[p].push(Step::Marker);
                    }
                }
            }
        }
        for (i, rule) in self.rules.iter_mut().enumerate() {
            let Some(m) = &rule.skip_after else { continue };
            let (p, at) = positions[i];
            rule.jump = Some(
                markers[p]
                    .iter()
                    .find(|(pos, name)| *pos > at && name == m)
                    .map(|(pos, _)| pos + 1)
                    .unwrap_or(phases[p].len()),
            );
        }
        let chain_stages: Vec<Vec<u16>> = (0..self.chain_parent.len())
            .map(|c| {
                let mut stages = vec![c as u16];
                while let (p, Some(_)) = self.chain_parent[*stages.last().unwrap() as usize] {
                    stages.push(p);
                }
                stages.reverse();
                stages
            })
            .collect();
        for t in self
            .rules
            .iter_mut()
            .flat_map(|r| r.links.iter_mut())
            .flat_map(|l| l.targets.iter_mut())
        {
            if let (Var::Tx, Selector::Regex(r)) = (t.var, &t.sel) {
                let slots = (0..self.tx_names.len() as u16)
                    .filter(|&s| r.is_match(self.tx_names[s as usize].as_bytes()))
                    .collect();
                t.sel = Selector::TxRegex(r.clone(), slots);
            }
        }
        let chain_triggers = self
            .chain_list
            .iter()
            .map(|c| {
                c.iter()
                    .try_fold(ByteSet::default(), |acc, t| Some(acc.union(t.triggers()?)))
            })
            .collect();
        Ok(Ruleset {
            score_slot: self.tx.get("anomaly_score").copied(),
            prefilter: prefilter::build(&self.rules, &chain_stages),
            rules: self.rules,
            phases,
            tx_names: self.tx_names,
            tx_slots: self.tx,
            chains: self.chain_list,
            chain_stages,
            chain_parent: self.chain_parent,
            chain_triggers,
            unsupported: self.unsupported,
            notes: self.notes,
            files: self.files,
        })
    }
}

fn tx_only(rule: &Rule) -> bool {
    use super::macros::Part;
    let expand_ok = |e: &Expand| {
        e.parts
            .iter()
            .all(|p| matches!(p, Part::Lit(_) | Part::Tx(_)))
    };
    let op_ok = |k: &Kind| match k {
        Kind::Unconditional | Kind::NoMatch | Kind::Rx(_) | Kind::Pm(..) => true,
        Kind::StrEq(e)
        | Kind::Contains(e)
        | Kind::BeginsWith(e)
        | Kind::EndsWith(e)
        | Kind::Within(e)
        | Kind::Num(_, e) => expand_ok(e),
        _ => false,
    };
    rule.links.iter().all(|l| {
        let unconditional = matches!(l.op.kind, Kind::Unconditional) && !l.op.negated;
        (unconditional || l.targets.iter().all(|t| t.var == Var::Tx))
            && l.excludes.is_empty()
            && !l.capture
            && !l.multi_match
            && op_ok(&l.op.kind)
            && l.effects.iter().all(|e| match e {
                Effect::Set { name, value, .. } => {
                    expand_ok(value) && matches!(name, TxName::Slot(_))
                }
                Effect::Unset(TxName::Slot(_)) => true,
                _ => false,
            })
    })
}

impl Rule {
    /// The TX slots this rule reads when they are all its outcome depends on: TX targets by
    /// name, operator arguments of literals and TX, and nothing it does but `pass` and a
    /// jump (CRS's `TX:EXECUTING_PARANOIA_LEVEL "@lt 2" ... skipAfter` rules, 100-odd of
    /// them). While no later rule writes those slots, its outcome is fixed per route.
    pub fn static_reads(&self) -> Option<Vec<u16>> {
        use super::macros::Part;
        if !self.tx_only || self.log || self.disruptive != Disruptive::Pass {
            return None;
        }
        let mut reads = Vec::new();
        for l in &self.links {
            if !l.effects.is_empty() {
                return None;
            }
            for t in &l.targets {
                match t.sel {
                    Selector::TxSlot(s) => reads.push(s),
                    _ if matches!(l.op.kind, Kind::Unconditional) => {}
                    _ => return None,
                }
            }
            for p in l.op.kind.argument().map_or(&[][..], |e| &e.parts) {
                match p {
                    Part::Tx(s) => reads.push(*s),
                    Part::Lit(_) => {}
                    _ => return None,
                }
            }
        }
        Some(reads)
    }

    /// Adds the TX slots this rule may write to `w`.
    pub fn tx_writes(&self, tx_names: &[String], w: &mut [bool]) {
        use super::macros::Part;
        for l in &self.links {
            if l.capture {
                let n = w.len().min(10);
                w[..n].fill(true);
            }
            for e in &l.effects {
                let name = match e {
                    Effect::Set { name, .. } | Effect::Unset(name) => name,
                    Effect::Ctl(_) => continue,
                };
                match name {
                    TxName::Slot(s) => w[*s as usize] = true,
                    // A name built by macros may be any name starting with its literal part.
                    TxName::Dynamic(e) => {
                        let prefix: &[u8] = match e.parts.first() {
                            Some(Part::Lit(l)) => l,
                            _ => b"",
                        };
                        for (s, n) in tx_names.iter().enumerate() {
                            if n.as_bytes().starts_with(prefix) {
                                w[s] = true;
                            }
                        }
                    }
                }
            }
        }
    }
}

/// A target's `:key` or `:/regex/` (names compare without case; regexes as `@rx` reads them).
pub fn selector(raw: &Option<RawSelector>) -> Result<Selector, String> {
    Ok(match raw {
        None => Selector::All,
        Some(RawSelector::Key(k)) => Selector::Key(k.to_ascii_lowercase().into_bytes()),
        Some(RawSelector::Regex(r)) => Selector::Regex(
            regex::bytes::RegexBuilder::new(&operator::translate_pcre(r, true))
                .case_insensitive(true)
                .unicode(false)
                .build()
                .map_err(|e| format!("selector /{r}/: {e}"))?,
        ),
    })
}

enum DirectiveError {
    Syntax(String),
    Nested(Vec<SyntaxError>),
}

enum LinkError {
    Syntax(String),
    Unsupported(String),
}

fn parse_phase(v: Option<&str>) -> Result<u8, String> {
    match v.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Some("1") => Ok(1),
        Some("2") | Some("request") => Ok(2),
        Some("3") => Ok(3),
        Some("4") | Some("response") => Ok(4),
        Some("5") | Some("logging") => Ok(5),
        other => Err(format!("phase `{}` is not 1-5", other.unwrap_or(""))),
    }
}

/// `942100` or `942100-942199`.
pub fn id_range(s: &str) -> Result<(u32, u32), String> {
    let s = s.trim();
    let num = |x: &str| {
        x.trim()
            .parse::<u32>()
            .map_err(|_| format!("`{s}` is not a rule id or id range"))
    };
    match s.split_once('-') {
        Some((a, b)) => Ok((num(a)?, num(b)?)),
        None => {
            let n = num(s)?;
            Ok((n, n))
        }
    }
}
