//! Reference cycles between store paths.
//!
//! Nix never produces one (a path can only reference paths that existed before it, and
//! itself), but a signer can sign anything. A path is committed only once its references are
//! valid, so the members of a cycle would wait for each other forever: the walk looks for a
//! cycle once every path of the closure is resolved, and refuses it. Pure; no I/O.

use std::collections::{BTreeMap, HashMap};

use crate::nix::StorePath;

/// A cycle in `refs` (self-references ignored), as its paths in order from the smallest one,
/// repeated at the end, or `None` if the graph is acyclic. References to paths without an
/// entry count as leaves. Linear in the size of the graph.
pub fn find_cycle(refs: &BTreeMap<StorePath, Vec<StorePath>>) -> Option<Vec<StorePath>> {
    let edges = |p| edges(refs, p);
    // Peel off leaves until none is left: what remains is a cycle or leads into one.
    let mut out_degree: HashMap<&StorePath, usize> =
        refs.keys().map(|p| (p, edges(p).count())).collect();
    let mut referrers: HashMap<&StorePath, Vec<&StorePath>> = HashMap::new();
    for p in refs.keys() {
        for r in edges(p) {
            referrers.entry(r).or_default().push(p);
        }
    }
    let mut leaves: Vec<&StorePath> = out_degree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(p, _)| *p)
        .collect();
    while let Some(leaf) = leaves.pop() {
        out_degree.remove(leaf);
        for referrer in referrers.get(leaf).into_iter().flatten() {
            if let Some(d) = out_degree.get_mut(referrer) {
                *d -= 1;
                if *d == 0 {
                    leaves.push(referrer);
                }
            }
        }
    }
    // Every remaining path references a remaining path: walk until one repeats.
    let start = out_degree.keys().min()?;
    let mut walk: Vec<&StorePath> = vec![start];
    loop {
        let last = walk[walk.len() - 1];
        let next = edges(last).filter(|r| out_degree.contains_key(r)).min()?; // never `None`: a remaining path has a remaining reference
        if let Some(i) = walk.iter().position(|p| *p == next) {
            let mut cycle: Vec<StorePath> = walk[i..].iter().map(|p| (*p).clone()).collect();
            let first = (0..cycle.len()).min_by_key(|&j| &cycle[j]).unwrap_or(0);
            cycle.rotate_left(first);
            cycle.push(cycle[0].clone());
            return Some(cycle);
        }
        walk.push(next);
    }
}

/// The references of `p` that have an entry in `refs`, other than `p` itself.
fn edges<'a>(
    refs: &'a BTreeMap<StorePath, Vec<StorePath>>,
    p: &'a StorePath,
) -> impl Iterator<Item = &'a StorePath> + 'a {
    refs.get(p)
        .into_iter()
        .flatten()
        .filter(move |r| *r != p && refs.contains_key(*r))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(n: u8) -> StorePath {
        StorePath::new([n; 20], &format!("p{n}")).unwrap()
    }

    fn graph(edges: &[(u8, &[u8])]) -> BTreeMap<StorePath, Vec<StorePath>> {
        edges
            .iter()
            .map(|(p, rs)| (sp(*p), rs.iter().map(|r| sp(*r)).collect()))
            .collect()
    }

    #[test]
    fn self_references_and_diamonds_are_not_cycles() {
        let g = graph(&[(1, &[2, 3, 1]), (2, &[4]), (3, &[4, 3]), (4, &[4, 9])]);
        assert_eq!(find_cycle(&g), None);
        assert_eq!(find_cycle(&BTreeMap::new()), None);
    }

    #[test]
    fn cycles_are_found_even_behind_other_paths() {
        let g = graph(&[(1, &[2]), (2, &[1])]);
        let (x, y) = (sp(1).min(sp(2)), sp(1).max(sp(2)));
        assert_eq!(find_cycle(&g), Some(vec![x.clone(), y, x]));
        // root -> 5 -> 6 -> 7 -> 5, and 7 -> leaf.
        let g = graph(&[(1, &[5]), (5, &[6, 5]), (6, &[7]), (7, &[5, 8]), (8, &[])]);
        let mut cycle = find_cycle(&g).unwrap();
        assert_eq!(cycle.first(), cycle.last());
        cycle.pop();
        assert!(cycle.iter().all(|p| *p >= cycle[0]));
        cycle.sort();
        let mut want = vec![sp(5), sp(6), sp(7)];
        want.sort();
        assert_eq!(cycle, want);
    }
}
