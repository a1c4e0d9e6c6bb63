//! Rule prefiltering: one regex set per kind of request value (argument values, argument
//! names, header values, `REQUEST_FILENAME`, ...), run once per value and distinct
//! transformation result, tells which rules' first `@rx` or `@pm` can match at all, so the
//! others are skipped without walking their targets.
//!
//! CRS runs some 200 patterns over the same values (`REQUEST_COOKIES|REQUEST_COOKIES_NAMES|
//! ARGS_NAMES|ARGS|XML:/*`, the request headers), each through one of some twenty
//! transformation chains. A benign value matches none of them, and most chains leave it as
//! it is: one set over all of a kind's patterns runs once per distinct value the chains
//! produce, where evaluating the rules one by one ran every pattern on every value.
//!
//! The prefilter is exact in one direction only: a rule it rules out cannot match (its first
//! link would have had to match one of the values the sets saw, through the same chain, with
//! the same pattern); a rule it lets through runs as before, with its captures, exclusions
//! and effects. Exclusions only remove values, so the sets, run without them, see a superset.

use std::sync::Arc;

use regex::bytes::{RegexSet, RegexSetBuilder};

use super::compile::{Rule, Selector, Target};
use super::operator::{Kind, Rx};
use super::request::{List, Scalar, Var};

/// The prefilter of a ruleset.
#[derive(Debug, Default)]
pub struct Prefilter {
    pub groups: Vec<Group>,
    /// Per rule index: the groups that can let it through, or None when it is not prefiltered.
    pub of_rule: Vec<Option<Box<[u16]>>>,
}

/// Where a value comes from: the values or the names of a list, the values of one name in
/// a list (`REQUEST_HEADERS:Content-Type`), or a single variable. A rule that reads one
/// header sits in that header's group: in the group of all headers its pattern would be
/// tried, and often match, on every other header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    List(List, bool),
    /// Lowercased name.
    Key(List, Vec<u8>),
    Scalar(Scalar),
}

impl Source {
    /// Whether a client sends the same values on every request (headers, cookies): what the
    /// set found in them is worth remembering (see [`super::memo`]).
    pub fn repeats(&self) -> bool {
        matches!(
            self,
            Source::List(List::Headers | List::Cookies, false)
                | Source::Key(List::Headers | List::Cookies, _)
        )
    }
}

/// What a target reads (`ARGS` reads query and body arguments).
pub fn sources(t: &Target) -> impl Iterator<Item = Source> + '_ {
    let lists = match t.var {
        Var::Args => [Some((List::ArgsGet, false)), Some((List::ArgsPost, false))],
        Var::ArgsNames => [Some((List::ArgsGet, true)), Some((List::ArgsPost, true))],
        v => [v.source(), None],
    };
    let scalar = Scalar::of(t.var).map(Source::Scalar);
    lists
        .into_iter()
        .flatten()
        .map(|(l, names)| match &t.sel {
            Selector::Key(k) if !names => Source::Key(l, k.clone()),
            _ => Source::List(l, names),
        })
        .chain(scalar)
}

/// The values of one source and the set their rules' patterns form.
#[derive(Debug)]
pub struct Group {
    pub source: Source,
    pub matcher: Arc<Matcher>,
}

/// One set and what its patterns stand for; sources read by mostly the same rules share one.
#[derive(Debug)]
pub struct Matcher {
    /// Its own in the memo of values that matched nothing.
    pub memo: u64,
    /// The chains the patterns read values through (every stage of a `multiMatch` chain).
    pub chains: Vec<u16>,
    pub set: RegexSet,
    /// Per pattern of `set`: its rule index, and which of `chains` it applies to (bit mask).
    pub patterns: Vec<(u32, u64)>,
}

/// The longest `@pm` list a set takes.
const MAX_PHRASES: usize = 300;

/// The pattern of a rule's first link, when it can be prefiltered: an `@rx`, or a `@pm` as
/// an alternation of its phrases, on request values (not TX or MATCHED_VARS, which change
/// while rules run), not negated, not counted.
fn prefilterable(rule: &Rule) -> Option<String> {
    let link = rule.links.first()?;
    let pattern = match &link.op.kind {
        Kind::Rx(Rx::Bytes(re)) => re.as_str().to_string(),
        // Phrases compare without ASCII case, which `(?i)` without Unicode does too. Long
        // lists (CRS's 1 100 OS file names) would make the set's automaton large: their own
        // Aho-Corasick runs them.
        Kind::Pm(_, phrases)
            if phrases.len() <= MAX_PHRASES && phrases.iter().all(|p| p.is_ascii()) =>
        {
            let alternatives: Vec<String> = phrases.iter().map(|p| regex::escape(p)).collect();
            format!("(?i:{})", alternatives.join("|"))
        }
        _ => return None,
    };
    let dynamic = |v: Var| {
        matches!(
            v,
            Var::Tx
                | Var::MatchedVar
                | Var::MatchedVarName
                | Var::MatchedVars
                | Var::MatchedVarsNames
        )
    };
    let plain = !link.op.negated
        && !link.targets.is_empty()
        && link.targets.iter().all(|t| !t.count && !dynamic(t.var));
    plain.then_some(pattern)
}

/// Whether a rule's first link matches the empty string or a one-character value (`.`,
/// `^\d+$`): it would let its rule through on almost every value, and cost the set a full
/// scan for nothing.
fn matches_anything(rule: &Rule) -> bool {
    let probes = [&b""[..], b"a", b"1", b"/", b" "];
    match &rule.links[0].op.kind {
        Kind::Rx(rx) => probes.iter().any(|p| rx.is_match(p)),
        Kind::Pm(ac, _) => probes.iter().any(|p| ac.is_match(*p)),
        _ => true,
    }
}

/// Groups the rules that can be prefiltered by the sources their first link reads. Patterns
/// that match almost anything are left out (see [`matches_anything`]). Sources read by
/// mostly the same rules (query and body arguments, cookies) share one set of the union:
/// a set costs time to build, and the target check on each match keeps a pattern to the
/// values its rule reads. A set takes at most 64 chains; a rule that does not fit, or whose
/// set fails to build (too large), is not prefiltered and runs one by one.
pub fn build(rules: &[Rule], chain_stages: &[Vec<u16>]) -> Prefilter {
    struct Candidate {
        rule: u32,
        pattern: String,
        stages: Vec<u16>,
    }
    /// Sources and the candidates (indexes) that read them.
    struct Cluster {
        sources: Vec<Source>,
        members: Vec<usize>,
        chains: Vec<u16>,
    }
    let chains_with = |chains: &[u16], extra: &[u16]| {
        let mut c = chains.to_vec();
        for s in extra {
            if !c.contains(s) {
                c.push(*s);
            }
        }
        c
    };
    let mut candidates: Vec<Candidate> = Vec::new();
    let mut by_source: Vec<(Source, Vec<usize>, Vec<u16>)> = Vec::new();
    let mut rule_sources: Vec<(u32, Vec<Source>)> = Vec::new();
    for (ri, rule) in rules.iter().enumerate() {
        let Some(pattern) = prefilterable(rule) else {
            continue;
        };
        if matches_anything(rule) {
            continue;
        }
        let link = &rule.links[0];
        let stages = match link.multi_match {
            true => chain_stages[link.chain as usize].clone(),
            false => vec![link.chain],
        };
        let mut mine: Vec<Source> = Vec::new();
        for t in &link.targets {
            for src in sources(t) {
                if !mine.contains(&src) {
                    mine.push(src);
                }
            }
        }
        let fits = mine
            .iter()
            .all(|src| match by_source.iter().find(|b| b.0 == *src) {
                Some((_, _, chains)) => chains_with(chains, &stages).len() <= 64,
                None => stages.len() <= 64,
            });
        if !fits {
            continue;
        }
        let c = candidates.len();
        for src in &mine {
            match by_source.iter_mut().find(|b| b.0 == *src) {
                Some((_, members, chains)) => {
                    members.push(c);
                    *chains = chains_with(chains, &stages);
                }
                None => by_source.push((src.clone(), vec![c], stages.clone())),
            }
        }
        candidates.push(Candidate {
            rule: ri as u32,
            pattern,
            stages,
        });
        rule_sources.push((ri as u32, mine));
    }
    let mut clusters: Vec<Cluster> = Vec::new();
    for (src, members, chains) in by_source {
        let similar = clusters.iter_mut().find(|c| {
            let shared = members.iter().filter(|m| c.members.contains(m)).count();
            let union = members.len() + c.members.len() - shared;
            shared * 5 >= union * 4 && chains_with(&c.chains, &chains).len() <= 64
        });
        match similar {
            Some(c) => {
                c.sources.push(src);
                c.chains = chains_with(&c.chains, &chains);
                for m in members {
                    if !c.members.contains(&m) {
                        c.members.push(m);
                    }
                }
            }
            None => clusters.push(Cluster {
                sources: vec![src],
                members,
                chains,
            }),
        }
    }
    let mut pf = Prefilter {
        groups: Vec::new(),
        of_rule: vec![None; rules.len()],
    };
    for c in clusters {
        let built = RegexSetBuilder::new(c.members.iter().map(|&m| &candidates[m].pattern))
            .unicode(false)
            .dot_matches_new_line(true)
            .multi_line(true)
            .size_limit(256 << 20)
            .dfa_size_limit(4 << 20)
            .build();
        let Ok(set) = built else {
            continue;
        };
        let patterns = c.members.iter().map(|&m| {
            let cand = &candidates[m];
            let mask = cand.stages.iter().fold(0u64, |mask, s| {
                mask | 1 << c.chains.iter().position(|x| x == s).unwrap_or(0)
            });
            (cand.rule, mask)
        });
        let matcher = Arc::new(Matcher {
            memo: super::memo::domain(),
            patterns: patterns.collect(),
            chains: c.chains,
            set,
        });
        for source in c.sources {
            pf.groups.push(Group {
                source,
                matcher: matcher.clone(),
            });
        }
    }
    for (ri, mine) in rule_sources {
        // A rule is prefiltered only when every source it reads has a set.
        let groups: Option<Box<[u16]>> = mine
            .iter()
            .map(|src| {
                pf.groups
                    .iter()
                    .position(|g| g.source == *src)
                    .map(|g| g as u16)
            })
            .collect();
        pf.of_rule[ri as usize] = groups;
    }
    pf
}
