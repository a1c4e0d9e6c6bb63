//! Running a [`Ruleset`] on one request: phase 1 on the head, the body's collections, phase 2.
//!
//! Per request this allocates the TX slots, a transformation cache (one `u32` per value and
//! transformation chain, so a value is decoded once however many rules read it that way),
//! the prefilter's verdicts (a flag per rule) and whatever the transformations produce. Rule
//! state is never allocated: rules, targets and operators are shared, compiled data.
//!
//! Two shortcuts keep a benign request from running every rule, and change no verdict (a
//! test runs the corpus with and without them): the prefilter (see [`super::prefilter`])
//! skips rules whose first pattern no value can match, and rules that only test TX
//! variables no later rule writes have their outcome computed once per route ([`Start`]).

use std::borrow::Cow;

use super::compile::{
    Assign, Ctl, Disruptive, Effect, EngineCtl, Link, Rule, Ruleset, Selector, Step, Target, TxName,
};
use super::macros::{Expand, Part};
use super::memo;
use super::operator::{atoi, Context};
use super::prefilter::{self, Source};
use super::request::{Head, List, Processor, Request, Scalar, Var};
use super::transform::{ByteSet, Transform};

/// A route's view of the ruleset: what it presets, excludes, and whether it only detects.
#[derive(Debug, Clone)]
pub struct RouteWaf {
    pub detect_only: bool,
    /// TX variables and the first step after the static setup rules (see [`start`]).
    pub start: Start,
    /// Rules this route never runs (exclusions by id or tag), by rule index.
    pub removed: Vec<bool>,
    /// Targets a rule ignores on this route, by rule index.
    pub target_excludes: Vec<Vec<Target>>,
}

/// A rule that matched and logs.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub id: u32,
    pub msg: String,
    /// `ARGS:q`
    pub var: String,
    /// The matched value, truncated; `***` for secret-looking names.
    pub data: String,
}

#[derive(Debug, Clone, Default)]
pub struct Outcome {
    /// The rule whose `deny` refused the request (not set in detection-only mode).
    pub blocked_by: Option<u32>,
    /// Detection-only: the rule that would have refused it.
    pub would_block: Option<u32>,
    pub findings: Vec<Finding>,
    /// `tx.anomaly_score` at the end.
    pub score: i64,
}

/// Runs phases 1 and 2. `body`: what was read of the request body (None: no body).
pub fn inspect(rs: &Ruleset, route: &RouteWaf, head: &Head<'_>, body: Option<&[u8]>) -> Outcome {
    let tx = route
        .start
        .tx
        .iter()
        .map(|v| v.as_deref().map(Cow::Borrowed));
    let mut t = Txn::new(rs, route, Request::new(head), tx.collect());
    let mut cache = Cache::new(rs, t.req.ids());
    if t.run_phase(&mut cache, 0, route.start.step) {
        if let Some(b) = body {
            let p = t.processor.unwrap_or(t.req.processor);
            t.req.add_body(b, p, t.force_body);
            cache.body_added();
        }
        t.run_phase(&mut cache, 1, 0);
    }
    t.out.score = rs
        .score_slot
        .and_then(|s| t.tx[s as usize].as_deref().map(atoi))
        .unwrap_or(0);
    t.out
}

/// Where every request of a route starts: the TX variables after the leading rules that read
/// and write only TX (CRS's setup and defaults, 20-odd rules), and the phase-1 step after
/// them. Those rules give the same result for every request, so they run once, here.
/// So do later rules that only test TX variables no rule after the start writes: their
/// outcome, by rule index, is in `fixed`.
#[derive(Debug, Clone, Default)]
pub struct Start {
    pub tx: Vec<Option<Vec<u8>>>,
    pub step: usize,
    pub fixed: Vec<Option<bool>>,
}

/// Runs the static prefix of phase 1 for a route with these TX presets.
pub fn start(rs: &Ruleset, route: &RouteWaf, presets: &[(u16, Vec<u8>)]) -> Start {
    let headers = http::HeaderMap::new();
    let head = Head {
        method: "GET",
        target: "/",
        protocol: "HTTP/1.1",
        headers: &headers,
        authority: None,
        remote_addr: "",
        unique_id: "",
    };
    let mut tx = vec![None; rs.tx_names.len()];
    for (slot, v) in presets {
        tx[*slot as usize] = Some(Cow::Owned(v.clone()));
    }
    let mut t = Txn::new(rs, route, Request::new(&head), tx);
    let mut cache = Cache::new(rs, t.req.ids());
    let steps = &rs.phases[0];
    let mut i = 0;
    while i < steps.len() {
        let ri = match steps[i] {
            Step::Marker => {
                i += 1;
                continue;
            }
            Step::Rule(ri) => ri as usize,
        };
        let rule = &rs.rules[ri];
        if !rule.tx_only || route.removed[ri] {
            break;
        }
        let before = t.tx.clone();
        i = if t.eval_rule(&mut cache, ri) {
            if rule.disruptive != Disruptive::Pass || rule.log {
                // It acts on every request (901001 refuses a CRS without setup): leave it to them.
                t.tx = before;
                break;
            }
            rule.jump.unwrap_or(i + 1 + rule.skip)
        } else {
            i + 1
        };
    }
    // Slots that may change after the start: written by a rule that runs per request.
    let mut written = vec![false; rs.tx_names.len()];
    let later = steps[i..].iter().chain(&rs.phases[1]);
    for step in later {
        if let Step::Rule(ri) = step {
            rs.rules[*ri as usize].tx_writes(&rs.tx_names, &mut written);
        }
    }
    let fixed = (0..rs.rules.len())
        .map(|ri| {
            let reads = rs.rules[ri].static_reads()?;
            if reads.iter().any(|&s| written[s as usize]) {
                return None;
            }
            Some(t.eval_rule(&mut cache, ri))
        })
        .collect();
    Start {
        tx: t.tx.into_iter().map(|v| v.map(Cow::into_owned)).collect(),
        step: i,
        fixed,
    }
}

struct Txn<'r, 'a> {
    rs: &'r Ruleset,
    route: &'r RouteWaf,
    req: Request<'a>,
    /// Borrowed from the route's precomputed start, owned once a rule sets them.
    tx: Vec<Option<Cow<'r, [u8]>>>,
    /// TX variables whose names were made by macros.
    tx_extra: Vec<(Vec<u8>, Vec<u8>)>,
    matched_var: Vec<u8>,
    matched_var_name: Vec<u8>,
    /// MATCHED_VARS of the rule being run: (name, value).
    matched_vars: Pairs,
    /// Reused for each link's matches.
    hits: Pairs,
    rule_id: u32,
    removed_ids: Vec<(u32, u32)>,
    removed_tags: Vec<String>,
    removed_targets: Vec<(RuleSel, Target)>,
    engine: EngineCtl,
    force_body: bool,
    processor: Option<Processor>,
    out: Outcome,
}

enum RuleSel {
    Ids(u32, u32),
    Tag(String),
}

/// Transformed values by (value id, chain): `UNSET`, `SAME` (the chain changed nothing) or an
/// index into `arena`. And what the prefilter found: which groups ran, which rules may match.
struct Cache<'r> {
    chains: usize,
    parents: &'r [(u16, Option<Transform>)],
    triggers: &'r [Option<ByteSet>],
    idx: Vec<u32>,
    /// The bytes each value holds, by value id (None until a chain asks).
    bytes: Vec<Option<ByteSet>>,
    arena: Vec<Vec<u8>>,
    filtered: Vec<bool>,
    may_match: Vec<bool>,
}

const UNSET: u32 = u32::MAX;
const SAME: u32 = u32::MAX - 1;
const SCALAR_IDS: usize = 16;

impl<'r> Cache<'r> {
    fn new(rs: &'r Ruleset, ids: usize) -> Cache<'r> {
        let chains = rs.chains.len();
        Cache {
            chains,
            parents: &rs.chain_parent,
            triggers: &rs.chain_triggers,
            idx: vec![UNSET; chains * ids],
            bytes: vec![None; ids],
            arena: Vec::new(),
            filtered: vec![false; rs.prefilter.groups.len()],
            may_match: vec![false; rs.rules.len()],
        }
    }

    /// Scalars (REQUEST_BODY, ARGS_COMBINED_SIZE, ...) change when the body is added, and
    /// lists grow: the prefilter runs again.
    fn body_added(&mut self) {
        let n = (SCALAR_IDS * self.chains).min(self.idx.len());
        self.idx[..n].fill(UNSET);
        let n = SCALAR_IDS.min(self.bytes.len());
        self.bytes[..n].fill(None);
        self.filtered.fill(false);
        self.may_match.fill(false);
    }

    /// Value `id` (`v`) after `chain`, computed from its prefix chain's result.
    fn get<'v>(&'v mut self, id: u32, chain: u16, v: &'v [u8]) -> &'v [u8] {
        let slot = self.slot(id, chain, v);
        self.resolve(slot, v)
    }

    fn bytes(&mut self, id: u32, v: &[u8]) -> &ByteSet {
        let i = id as usize;
        if i >= self.bytes.len() {
            self.bytes.resize(i + 16, None);
        }
        self.bytes[i].get_or_insert_with(|| ByteSet::bytes_of(v))
    }

    /// The value a slot of [`Cache::slot`] stands for (`v`: the untransformed value).
    fn resolve<'v>(&'v self, slot: u32, v: &'v [u8]) -> &'v [u8] {
        match slot {
            SAME => v,
            i => &self.arena[i as usize],
        }
    }

    fn slot(&mut self, id: u32, chain: u16, v: &[u8]) -> u32 {
        let (parent, Some(last)) = self.parents[chain as usize] else {
            return SAME;
        };
        // Most values hold none of the bytes the chain's transformations act on.
        if let Some(t) = &self.triggers[chain as usize] {
            if !t.intersects(self.bytes(id, v)) {
                return SAME;
            }
        }
        let k = id as usize * self.chains + chain as usize;
        if k >= self.idx.len() {
            self.idx.resize((id as usize + 16) * self.chains, UNSET);
        }
        if self.idx[k] != UNSET {
            return self.idx[k];
        }
        let base = self.slot(id, parent, v);
        let input: &[u8] = if base == SAME {
            v
        } else {
            &self.arena[base as usize]
        };
        let out = match last.apply(input) {
            Cow::Borrowed(b) if b.as_ptr() == input.as_ptr() && b.len() == input.len() => None,
            other => Some(other.into_owned()),
        };
        let r = match out {
            None => base,
            Some(o) => {
                self.arena.push(o);
                (self.arena.len() - 1) as u32
            }
        };
        self.idx[k] = r;
        r
    }
}

/// A value before and after each transformation of `ts`, each distinct stage once.
fn stages(v: &[u8], ts: &[Transform]) -> Vec<Vec<u8>> {
    let mut out = vec![v.to_vec()];
    for t in ts {
        let next = t.apply(out.last().unwrap()).into_owned();
        if next != *out.last().unwrap() {
            out.push(next);
        }
    }
    out
}

fn apply_chain<'v>(v: &'v [u8], ts: &[Transform]) -> Cow<'v, [u8]> {
    let mut cur = Cow::Borrowed(v);
    for t in ts {
        cur = match cur {
            Cow::Borrowed(b) => t.apply(b),
            Cow::Owned(o) => Cow::Owned(t.apply(&o).into_owned()),
        };
    }
    cur
}

/// `f(var, key, value, cache id)` of [`Txn::for_each`].
type Visit<'f, 's> = dyn FnMut(Var, &[u8], &'s [u8], Option<u32>) + 'f;

/// Name/value pairs in one reused buffer: the matches of a link being evaluated, and
/// MATCHED_VARS of the rule being run. Items are (var, name start, value start, end).
#[derive(Default)]
struct Pairs {
    bytes: Vec<u8>,
    items: Vec<(Var, usize, usize, usize)>,
}

impl Pairs {
    fn clear(&mut self) {
        self.bytes.clear();
        self.items.clear();
    }

    fn push(&mut self, var: Var, name: &[&[u8]], value: &[u8]) {
        let n = self.bytes.len();
        for part in name {
            self.bytes.extend_from_slice(part);
        }
        let v = self.bytes.len();
        self.bytes.extend_from_slice(value);
        self.items.push((var, n, v, self.bytes.len()));
    }

    fn iter(&self) -> impl Iterator<Item = (Var, &[u8], &[u8])> {
        self.items
            .iter()
            .map(|&(var, n, v, e)| (var, &self.bytes[n..v], &self.bytes[v..e]))
    }
}

fn same_var(excl: Var, var: Var) -> bool {
    excl == var
        || (excl == Var::Args && matches!(var, Var::ArgsGet | Var::ArgsPost))
        || (excl == Var::ArgsNames && matches!(var, Var::ArgsGetNames | Var::ArgsPostNames))
}

impl<'r, 'a> Txn<'r, 'a> {
    fn new(
        rs: &'r Ruleset,
        route: &'r RouteWaf,
        req: Request<'a>,
        tx: Vec<Option<Cow<'r, [u8]>>>,
    ) -> Txn<'r, 'a> {
        Txn {
            rs,
            route,
            req,
            tx,
            tx_extra: Vec::new(),
            matched_var: Vec::new(),
            matched_var_name: Vec::new(),
            matched_vars: Pairs::default(),
            hits: Pairs::default(),
            rule_id: 0,
            removed_ids: Vec::new(),
            removed_tags: Vec::new(),
            removed_targets: Vec::new(),
            engine: if route.detect_only {
                EngineCtl::DetectionOnly
            } else {
                EngineCtl::On
            },
            force_body: false,
            processor: None,
            out: Outcome::default(),
        }
    }
}

impl Txn<'_, '_> {
    fn tx_name(&self, slot: u16) -> &[u8] {
        self.rs.tx_names[slot as usize].as_bytes()
    }

    fn selects(&self, t: &Target, key: &[u8]) -> bool {
        match &t.sel {
            Selector::All => true,
            Selector::Key(k) => key.eq_ignore_ascii_case(k),
            Selector::Regex(r) | Selector::TxRegex(r, _) => r.is_match(key),
            Selector::TxSlot(s) => key.eq_ignore_ascii_case(self.tx_name(*s)),
        }
    }

    fn excluded(&self, ri: usize, link: &Link, var: Var, key: &[u8]) -> bool {
        let hit = |t: &Target| same_var(t.var, var) && self.selects(t, key);
        link.excludes.iter().any(hit)
            || self.route.target_excludes[ri].iter().any(hit)
            || (!self.removed_targets.is_empty() && {
                let rule = &self.rs.rules[ri];
                self.removed_targets.iter().any(|(sel, t)| {
                    let applies = match sel {
                        RuleSel::Ids(a, b) => (*a..=*b).contains(&rule.id),
                        RuleSel::Tag(tag) => rule.tags.contains(tag),
                    };
                    applies && hit(t)
                })
            })
    }

    /// Calls `f(var, key, value, cache id)` for every value `t` selects.
    fn for_each<'s>(&'s self, t: &Target, f: &mut Visit<'_, 's>) {
        let var = t.var;
        if let Some(s) = Scalar::of(var) {
            f(var, b"", self.req.scalar(s), Some(s as u32));
            return;
        }
        let one;
        let lists: &[(List, bool)] = match var {
            Var::Args => &[(List::ArgsGet, false), (List::ArgsPost, false)],
            Var::ArgsNames => &[(List::ArgsGet, true), (List::ArgsPost, true)],
            _ => match var.source() {
                Some(s) => {
                    one = [s];
                    &one
                }
                None => &[],
            },
        };
        for &(list, names) in lists {
            for e in self.req.list(list) {
                if !self.selects(t, &e.name) {
                    continue;
                }
                if names {
                    f(var, &e.name, &e.name, Some(e.id + 1));
                } else {
                    f(var, &e.name, &e.value, Some(e.id));
                }
            }
        }
        match var {
            Var::Tx => match &t.sel {
                &Selector::TxSlot(s) => {
                    if let Some(v) = &self.tx[s as usize] {
                        f(var, self.tx_name(s), v, None);
                    }
                }
                Selector::TxRegex(r, slots) => {
                    for &s in slots {
                        if let Some(v) = &self.tx[s as usize] {
                            f(var, self.tx_name(s), v, None);
                        }
                    }
                    for (n, v) in &self.tx_extra {
                        if r.is_match(n) {
                            f(var, n, v, None);
                        }
                    }
                }
                _ => {
                    for (s, v) in self.tx.iter().enumerate() {
                        if let Some(v) = v {
                            let name = self.tx_name(s as u16);
                            if self.selects(t, name) {
                                f(var, name, v, None);
                            }
                        }
                    }
                    for (n, v) in &self.tx_extra {
                        if self.selects(t, n) {
                            f(var, n, v, None);
                        }
                    }
                }
            },
            Var::MatchedVar => f(var, b"", &self.matched_var, None),
            Var::MatchedVarName => f(var, b"", &self.matched_var_name, None),
            Var::MatchedVars => {
                for (_, n, v) in self.matched_vars.iter() {
                    f(var, n, v, None);
                }
            }
            Var::MatchedVarsNames => {
                for (_, n, _) in self.matched_vars.iter() {
                    f(var, n, n, None);
                }
            }
            _ => {}
        }
    }

    /// Evaluates every link of rule `ri`; true when the whole chain matched.
    fn eval_rule(&mut self, cache: &mut Cache, ri: usize) -> bool {
        let rs = self.rs;
        let rule = &rs.rules[ri];
        self.matched_vars.clear();
        self.rule_id = rule.id;
        for link in &rule.links {
            let mut hits = std::mem::take(&mut self.hits);
            hits.clear();
            // The groups of each matching value, in hit order (capture links only).
            let mut caps: Vec<Vec<Vec<u8>>> = Vec::new();
            let mut trial: Vec<Vec<u8>> = Vec::new();
            {
                let this = &*self;
                let ts = &rs.chains[link.chain as usize];
                for t in &link.targets {
                    if t.count {
                        let mut n = 0usize;
                        this.for_each(t, &mut |var, key, _, _| {
                            if !this.excluded(ri, link, var, key) {
                                n += 1;
                            }
                        });
                        let mut buf = [0u8; 20];
                        let s = decimal(n, &mut buf);
                        if link.op.eval(s, this, None) {
                            hits.push(t.var, &[], s);
                        }
                        continue;
                    }
                    this.for_each(t, &mut |var, key, value, id| {
                        if this.excluded(ri, link, var, key) {
                            return;
                        }
                        if link.multi_match {
                            // The operator sees the value before and after each transformation,
                            // each distinct stage once.
                            let Some(id) = id else {
                                for s in stages(value, ts) {
                                    if link.op.eval(&s, this, None) {
                                        hits.push(var, &[key], &s);
                                    }
                                }
                                return;
                            };
                            let mut prev = None;
                            for &c in &rs.chain_stages[link.chain as usize] {
                                let slot = cache.slot(id, c, value);
                                let s = cache.resolve(slot, value);
                                if prev.is_some_and(|p| cache.resolve(p, value) == s) {
                                    continue;
                                }
                                prev = Some(slot);
                                if link.op.eval(s, this, None) {
                                    hits.push(var, &[key], s);
                                }
                            }
                            return;
                        }
                        let v: Cow<[u8]> = match id {
                            Some(id) if !ts.is_empty() => {
                                Cow::Borrowed(cache.get(id, link.chain, value))
                            }
                            _ => apply_chain(value, ts),
                        };
                        let want = link.capture.then_some(&mut trial);
                        if link.op.eval(&v, this, want) {
                            if link.capture {
                                caps.push(std::mem::take(&mut trial));
                            }
                            hits.push(var, &[key], &v);
                        }
                    });
                }
            }
            if hits.items.is_empty() {
                self.hits = hits;
                return false;
            }
            // Like libmodsecurity, a link's setvar and ctl run once per matching value, with that
            // value as MATCHED_VAR and its groups as TX:0..9: CRS 920450 records every header
            // name this way, and a rule that matches three arguments scores three times.
            let mut caps = caps.into_iter();
            for (var, key, value) in hits.iter() {
                self.matched_var_name.clear();
                self.matched_var_name
                    .extend_from_slice(var.name().as_bytes());
                if !key.is_empty() {
                    self.matched_var_name.push(b':');
                    self.matched_var_name.extend_from_slice(key);
                }
                self.matched_var.clear();
                self.matched_var.extend_from_slice(value);
                self.matched_vars
                    .push(var, &[&self.matched_var_name], value);
                if let Some(groups) = caps.next() {
                    for (i, c) in groups.into_iter().enumerate().take(10) {
                        self.tx[i] = Some(Cow::Owned(c));
                    }
                }
                for e in &link.effects {
                    self.effect(e);
                }
            }
            self.hits = hits;
        }
        true
    }

    /// Whether rule `ri`'s first link can match, by the prefilter (see [`super::prefilter`]);
    /// true for rules it does not cover.
    fn may_match(&self, cache: &mut Cache, ri: usize) -> bool {
        let Some(Some(groups)) = self.rs.prefilter.of_rule.get(ri) else {
            return true;
        };
        for &g in groups.iter() {
            if !cache.filtered[g as usize] {
                cache.filtered[g as usize] = true;
                self.prefilter(cache, g as usize);
            }
        }
        cache.may_match[ri]
    }

    /// Runs group `g`'s set on every value of its source: once per distinct result of its
    /// chains, keeping a match when the pattern's chain gave that result and its rule's
    /// targets select the value.
    fn prefilter(&self, cache: &mut Cache, g: usize) {
        let rs = self.rs;
        let group = &rs.prefilter.groups[g];
        let m = &*group.matcher;
        // Distinct values: (slot, the chains that produce it); the value itself, then at
        // most one per chain.
        let mut distinct = [(SAME, 0u64); 65];
        let remembers = group.source.repeats();
        let mut visit = |cache: &mut Cache, name: &[u8], value: &[u8], id: u32| {
            if remembers && memo::known(m.memo, value) {
                return;
            }
            let mut found = false;
            // Most chains leave the value alone, known from its bytes alone.
            distinct[0] = (SAME, 0);
            let mut n = 1;
            let bytes = *cache.bytes(id, value);
            for (k, &c) in m.chains.iter().enumerate() {
                if let Some(t) = &rs.chain_triggers[c as usize] {
                    if !t.intersects(&bytes) {
                        distinct[0].1 |= 1 << k;
                        continue;
                    }
                }
                let slot = cache.slot(id, c, value);
                let v = cache.resolve(slot, value);
                match distinct[..n]
                    .iter_mut()
                    .find(|(s, _)| *s == slot || cache.resolve(*s, value) == v)
                {
                    Some((_, mask)) => *mask |= 1 << k,
                    None => {
                        distinct[n] = (slot, 1 << k);
                        n += 1;
                    }
                }
            }
            for &(slot, mask) in &distinct[..n] {
                if mask == 0 {
                    continue;
                }
                let v = cache.resolve(slot, value);
                // Most values match nothing: the cheaper test first.
                if !m.set.is_match(v) {
                    continue;
                }
                found = true;
                for i in m.set.matches(v).iter() {
                    let (ri, chains) = m.patterns[i];
                    // As in `for_each`, which reads a single variable whatever its key.
                    let scalar = matches!(group.source, Source::Scalar(_));
                    let selected = || {
                        rs.rules[ri as usize].links[0].targets.iter().any(|t| {
                            prefilter::sources(t).any(|s| s == group.source)
                                && (scalar || self.selects(t, name))
                        })
                    };
                    if chains & mask != 0 && selected() {
                        cache.may_match[ri as usize] = true;
                    }
                }
            }
            if remembers && !found {
                memo::remember(m.memo, value);
            }
        };
        match &group.source {
            Source::Scalar(s) => visit(cache, b"", self.req.scalar(*s), *s as u32),
            Source::List(l, names) => {
                for e in self.req.list(*l) {
                    if *names {
                        visit(cache, &e.name, &e.name, e.id + 1);
                    } else {
                        visit(cache, &e.name, &e.value, e.id);
                    }
                }
            }
            Source::Key(l, key) => {
                for e in self.req.list(*l) {
                    if e.name.eq_ignore_ascii_case(key) {
                        visit(cache, &e.name, &e.value, e.id);
                    }
                }
            }
        }
    }

    fn removed(&self, ri: usize, rule: &Rule) -> bool {
        self.route.removed[ri]
            || self
                .removed_ids
                .iter()
                .any(|&(a, b)| (a..=b).contains(&rule.id))
            || (!self.removed_tags.is_empty()
                && rule.tags.iter().any(|t| self.removed_tags.contains(t)))
    }

    /// Runs one phase; false when processing stops (a deny, `allow`, or the engine turned off).
    fn run_phase(&mut self, cache: &mut Cache, p: usize, from: usize) -> bool {
        let rs = self.rs;
        let steps = &rs.phases[p];
        let mut i = from;
        while i < steps.len() {
            let Step::Rule(ri) = steps[i] else {
                i += 1;
                continue;
            };
            let ri = ri as usize;
            let rule = &rs.rules[ri];
            if self.removed(ri, rule) {
                i += 1;
                continue;
            }
            // A ctl that removed targets may have removed what a fixed outcome read.
            let fixed = self.route.start.fixed.get(ri).copied().flatten();
            let matched = match fixed.filter(|_| self.removed_targets.is_empty()) {
                Some(m) => m,
                None => self.may_match(cache, ri) && self.eval_rule(cache, ri),
            };
            if !matched {
                i += 1;
                continue;
            }
            if self.engine == EngineCtl::Off {
                return false;
            }
            if rule.log {
                self.record(rule);
            }
            match rule.disruptive {
                Disruptive::Deny if self.engine == EngineCtl::On => {
                    self.out.blocked_by = Some(rule.id);
                    return false;
                }
                Disruptive::Deny => {
                    self.out.would_block.get_or_insert(rule.id);
                }
                Disruptive::Allow => return false,
                Disruptive::Pass => {}
            }
            i = rule.jump.unwrap_or(i + 1 + rule.skip);
        }
        true
    }

    fn record(&mut self, rule: &Rule) {
        let msg = rule
            .msg
            .as_ref()
            .map(|m| String::from_utf8_lossy(&self.expand(m)).into_owned())
            .unwrap_or_default();
        let var = String::from_utf8_lossy(&self.matched_var_name).into_owned();
        let data = if looks_secret(&var) {
            "***".to_string()
        } else {
            printable(&self.matched_var, 64)
        };
        self.out.findings.push(Finding {
            id: rule.id,
            msg,
            var,
            data,
        });
    }

    fn tx_get(&self, name: &TxName) -> Option<Vec<u8>> {
        match name {
            TxName::Slot(s) => self.tx[*s as usize].as_deref().map(<[u8]>::to_vec),
            TxName::Dynamic(e) => {
                let mut n = self.expand(e).into_owned();
                n.make_ascii_lowercase();
                match self.rs.slot(&n) {
                    Some(s) => self.tx[s].as_deref().map(<[u8]>::to_vec),
                    None => self
                        .tx_extra
                        .iter()
                        .find(|(k, _)| *k == n)
                        .map(|(_, v)| v.clone()),
                }
            }
        }
    }

    fn tx_put(&mut self, name: &TxName, v: Option<Vec<u8>>) {
        match name {
            TxName::Slot(s) => self.tx[*s as usize] = v.map(Cow::Owned),
            TxName::Dynamic(e) => {
                let mut n = self.expand(e).into_owned();
                n.make_ascii_lowercase();
                if let Some(s) = self.rs.slot(&n) {
                    self.tx[s] = v.map(Cow::Owned);
                    return;
                }
                self.tx_extra.retain(|(k, _)| *k != n);
                if let Some(v) = v {
                    self.tx_extra.push((n, v));
                }
            }
        }
    }

    fn effect(&mut self, e: &Effect) {
        match e {
            Effect::Set { name, value, how } => {
                let v = self.expand(value).into_owned();
                let new = match how {
                    Assign::Set => v,
                    Assign::Add | Assign::Sub => {
                        let cur = self.tx_get(name).map(|c| atoi(&c)).unwrap_or(0);
                        let d = atoi(&v);
                        let n = if *how == Assign::Add {
                            cur + d
                        } else {
                            cur - d
                        };
                        n.to_string().into_bytes()
                    }
                };
                self.tx_put(name, Some(new));
            }
            Effect::Unset(name) => self.tx_put(name, None),
            Effect::Ctl(c) => match c {
                Ctl::Engine(EngineCtl::On) => {}
                Ctl::Engine(m) => {
                    // A rule may relax the engine, never make a detect-only route block.
                    if !(self.engine == EngineCtl::DetectionOnly && *m == EngineCtl::On) {
                        self.engine = *m;
                    }
                }
                Ctl::RemoveById(a, b) => self.removed_ids.push((*a, *b)),
                Ctl::RemoveByTag(t) => self.removed_tags.push(t.clone()),
                Ctl::RemoveTargetById(a, b, t) => {
                    self.removed_targets.push((RuleSel::Ids(*a, *b), t.clone()))
                }
                Ctl::RemoveTargetByTag(tag, t) => self
                    .removed_targets
                    .push((RuleSel::Tag(tag.clone()), t.clone())),
                Ctl::ForceBody => self.force_body = true,
                Ctl::BodyProcessor(p) => self.processor = Some(*p),
            },
        }
    }

    fn first_value(&self, var: Var, key: Option<&str>) -> Vec<u8> {
        let sel = match key {
            Some(k) => Selector::Key(k.as_bytes().to_vec()),
            None => Selector::All,
        };
        let t = Target {
            var,
            sel,
            count: false,
        };
        let mut out = None;
        self.for_each(&t, &mut |_, _, v, _| {
            if out.is_none() {
                out = Some(v.to_vec());
            }
        });
        out.unwrap_or_default()
    }
}

impl Context for Txn<'_, '_> {
    fn expand<'e>(&'e self, e: &'e Expand) -> Cow<'e, [u8]> {
        if let Some(l) = e.literal() {
            return Cow::Borrowed(l);
        }
        if let [Part::Tx(s)] = e.parts.as_slice() {
            return Cow::Borrowed(self.tx[*s as usize].as_deref().unwrap_or(b""));
        }
        // One allocation for CRS's names and messages (`header_name_920450_%{tx.0}`).
        let mut out = Vec::with_capacity(64);
        for p in &e.parts {
            match p {
                Part::Lit(l) => out.extend_from_slice(l),
                Part::Tx(s) => {
                    if let Some(v) = &self.tx[*s as usize] {
                        out.extend_from_slice(v);
                    }
                }
                Part::Var(v, key) => out.extend(self.first_value(*v, key.as_deref())),
                Part::RuleId => out.extend_from_slice(self.rule_id.to_string().as_bytes()),
            }
        }
        Cow::Owned(out)
    }
}

/// `n` in decimal, without allocating (`&TX:x` counts are read by a rule in four).
fn decimal(mut n: usize, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &buf[i..];
        }
    }
}

/// Argument and header names whose values must not reach logs.
fn looks_secret(var: &str) -> bool {
    let v = var.to_ascii_lowercase();
    [
        "pass",
        "pwd",
        "secret",
        "token",
        "authorization",
        "cookie",
        "session",
        "key",
        "signature",
        "credential",
    ]
    .iter()
    .any(|s| v.contains(s))
}

/// Up to `max` bytes, control characters and non-UTF-8 escaped.
fn printable(v: &[u8], max: usize) -> String {
    let cut = &v[..v.len().min(max)];
    let mut s = String::new();
    for c in String::from_utf8_lossy(cut).chars() {
        if c.is_control() {
            s.push_str(&format!("\\x{:02x}", c as u32 & 0xff));
        } else {
            s.push(c);
        }
    }
    if v.len() > max {
        s.push('…');
    }
    s
}
