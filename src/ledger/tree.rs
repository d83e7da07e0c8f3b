//! The ledger's Merkle tree (RFC 9162): leaf i = SHA-256(0x00 || row_hash of row i + 1),
//! interior nodes SHA-256(0x01 || left || right), hashes of complete subtrees stored in
//! `ledger_tree` at their stored hash index (the layout of Go's `tlog` and C2SP tlog-tiles,
//! implemented by the `tlog_tiles` crate). Roots and proofs for any tree size read at most
//! O(log n) stored hashes, in one query.
//!
//! The writer keeps the tree's right edge (the [`Frontier`]) in memory to compute the hashes a
//! batch adds; they are inserted in the same statement as the batch's rows.

use std::cell::RefCell;
use std::collections::HashMap;

use sqlx::PgExecutor;
use tlog_tiles::{Hash, HashReader};

pub use tlog_tiles::{record_hash, stored_hash_count, stored_hash_index};

/// The leaf hash of a ledger row.
pub fn leaf_hash(row_hash: &[u8; 32]) -> [u8; 32] {
    record_hash(row_hash).0
}

/// The stored hash indexes that the next append (of leaf `size`) reads: the roots of the
/// complete subtrees on the tree's right edge.
pub fn frontier_indexes(size: u64) -> Vec<u64> {
    (0..64u8)
        .filter(|&level| (size >> level) & 1 == 1)
        .map(|level| stored_hash_index(level, (size >> level) - 1))
        .collect()
}

/// The right edge of the tree in memory, enough to append.
#[derive(Clone, Debug, Default)]
pub struct Frontier {
    pub size: u64,
    hashes: HashMap<u64, Hash>,
}

impl Frontier {
    /// The frontier of a tree of `size` leaves, from the stored hashes at
    /// [`frontier_indexes`]`(size)`.
    pub fn new(size: u64, stored: HashMap<u64, [u8; 32]>) -> Result<Self, String> {
        let hashes: HashMap<u64, Hash> = stored.into_iter().map(|(k, v)| (k, Hash(v))).collect();
        for idx in frontier_indexes(size) {
            if !hashes.contains_key(&idx) {
                return Err(format!("the ledger tree lacks stored hash {idx}"));
            }
        }
        Ok(Frontier { size, hashes })
    }

    /// Appends one leaf; returns the `(stored index, hash)` pairs to store.
    pub fn append(&mut self, row_hash: &[u8; 32]) -> Vec<(u64, [u8; 32])> {
        let n = self.size;
        let hashes = tlog_tiles::stored_hashes(n, row_hash, &Pass::Answer(&self.hashes))
            .expect("the frontier holds every hash an append reads");
        let first = stored_hash_index(0, n);
        let out: Vec<(u64, [u8; 32])> = hashes
            .iter()
            .enumerate()
            .map(|(i, h)| (first + i as u64, h.0))
            .collect();
        for &(idx, h) in &out {
            self.hashes.insert(idx, Hash(h));
        }
        self.size += 1;
        let keep: std::collections::HashSet<u64> =
            frontier_indexes(self.size).into_iter().collect();
        self.hashes.retain(|k, _| keep.contains(k));
        out
    }

    /// The root of the tree as it stands.
    pub fn root(&self) -> [u8; 32] {
        tlog_tiles::tree_hash(self.size, &Pass::Answer(&self.hashes))
            .expect("the frontier holds the root's hashes")
            .0
    }
}

/// The hashes a tlog function reads, in two passes: the first records which indexes it asks
/// for (failing the call), the second answers from the hashes fetched in one query. Every tlog
/// function used here reads its hashes in a single call.
pub enum Pass<'a> {
    Record(RefCell<Vec<u64>>),
    Answer(&'a HashMap<u64, Hash>),
}

impl HashReader for Pass<'_> {
    fn read_hashes(&self, indexes: &[u64]) -> Result<Vec<Hash>, tlog_tiles::Error> {
        match self {
            Pass::Record(wanted) => {
                wanted.borrow_mut().extend_from_slice(indexes);
                Err(tlog_tiles::Error::IndexesNotInTree)
            }
            Pass::Answer(map) => indexes
                .iter()
                .map(|i| {
                    map.get(i)
                        .copied()
                        .ok_or(tlog_tiles::Error::IndexesNotInTree)
                })
                .collect(),
        }
    }
}

/// Where stored hashes come from: the database, or memory (tests, verification).
pub trait Store {
    fn fetch(
        &self,
        indexes: &[u64],
    ) -> impl std::future::Future<Output = Result<HashMap<u64, [u8; 32]>, sqlx::Error>> + Send;
}

/// Runs `f` over the stored hashes it needs: one pass to learn the indexes, one fetch, one
/// pass to compute (see [`Pass`]).
pub async fn with_hashes<S: Store, T>(
    store: &S,
    f: impl Fn(&Pass) -> Result<T, tlog_tiles::Error>,
) -> Result<T, TreeError> {
    let record = Pass::Record(RefCell::new(Vec::new()));
    match f(&record) {
        Ok(v) => return Ok(v),
        Err(tlog_tiles::Error::IndexesNotInTree) => {}
        Err(e) => return Err(TreeError::Input(e.to_string())),
    }
    let Pass::Record(wanted) = record else {
        unreachable!("built as a recording pass")
    };
    let found = store.fetch(&wanted.into_inner()).await?;
    let map: HashMap<u64, Hash> = found.into_iter().map(|(k, v)| (k, Hash(v))).collect();
    f(&Pass::Answer(&map)).map_err(|e| match e {
        tlog_tiles::Error::IndexesNotInTree => {
            TreeError::Missing("the ledger tree lacks hashes for this size".into())
        }
        e => TreeError::Input(e.to_string()),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Missing(String),
    #[error(transparent)]
    Db(#[from] sqlx::Error),
}

/// MTH(size).
pub async fn root<S: Store>(store: &S, size: u64) -> Result<[u8; 32], TreeError> {
    with_hashes(store, |r| tlog_tiles::tree_hash(size, r))
        .await
        .map(|h| h.0)
}

/// The RFC 9162 inclusion proof of leaf `index` in the tree of `size` leaves.
pub async fn inclusion<S: Store>(
    store: &S,
    index: u64,
    size: u64,
) -> Result<Vec<[u8; 32]>, TreeError> {
    if index >= size {
        return Err(TreeError::Input(format!(
            "leaf_index {index} is not in a tree of size {size}"
        )));
    }
    with_hashes(store, |r| tlog_tiles::prove_record(size, index, r))
        .await
        .map(|p| p.into_iter().map(|h| h.0).collect())
}

/// The RFC 9162 consistency proof from the tree of `first` leaves to the one of `second`.
pub async fn consistency<S: Store>(
    store: &S,
    first: u64,
    second: u64,
) -> Result<Vec<[u8; 32]>, TreeError> {
    if first == 0 || first > second {
        return Err(TreeError::Input(format!(
            "a consistency proof needs 1 <= first <= second (got {first}, {second})"
        )));
    }
    with_hashes(store, |r| tlog_tiles::prove_tree(second, first, r))
        .await
        .map(|p| p.into_iter().map(|h| h.0).collect())
}

/// Checks an inclusion proof (the same algorithm a client runs).
pub fn check_inclusion(
    proof: &[[u8; 32]],
    size: u64,
    root: [u8; 32],
    index: u64,
    leaf: [u8; 32],
) -> bool {
    let p: Vec<Hash> = proof.iter().map(|h| Hash(*h)).collect();
    tlog_tiles::check_record(&p, size, Hash(root), index, Hash(leaf)).is_ok()
}

/// Checks a consistency proof.
pub fn check_consistency(
    proof: &[[u8; 32]],
    first: u64,
    first_root: [u8; 32],
    second: u64,
    second_root: [u8; 32],
) -> bool {
    let p: Vec<Hash> = proof.iter().map(|h| Hash(*h)).collect();
    tlog_tiles::check_tree(&p, second, Hash(second_root), first, Hash(first_root)).is_ok()
}

/// Stored hashes in Postgres (`ledger_tree`).
pub struct PgStore<'a>(pub &'a sqlx::PgPool);

impl Store for PgStore<'_> {
    async fn fetch(&self, indexes: &[u64]) -> Result<HashMap<u64, [u8; 32]>, sqlx::Error> {
        fetch(self.0, indexes).await
    }
}

/// The stored hashes at `indexes` (those that exist).
pub async fn fetch<'e, E: PgExecutor<'e>>(
    db: E,
    indexes: &[u64],
) -> Result<HashMap<u64, [u8; 32]>, sqlx::Error> {
    let idx: Vec<i64> = indexes.iter().map(|&i| i as i64).collect();
    let rows: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT idx, hash FROM ledger_tree WHERE idx = ANY($1)")
            .bind(&idx)
            .fetch_all(db)
            .await?;
    Ok(rows
        .into_iter()
        .filter_map(|(i, h)| Some((i as u64, <[u8; 32]>::try_from(h).ok()?)))
        .collect())
}

/// How many leaves the stored tree has: the inverse of [`stored_hash_count`] on the number of
/// stored hashes (`max(idx) + 1`, the hashes being dense).
pub fn size_from_stored(count: u64) -> Option<u64> {
    // stored_hash_count is increasing: binary search.
    let (mut lo, mut hi) = (0u64, count + 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if stored_hash_count(mid) < count {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    (stored_hash_count(lo) == count).then_some(lo)
}

/// Stored hashes in memory, for verification and tests.
#[derive(Default)]
pub struct MemStore(pub Vec<[u8; 32]>);

impl MemStore {
    /// The stored hashes of a tree over `leaves` (row hashes).
    pub fn build(row_hashes: &[[u8; 32]]) -> Self {
        let mut out = Vec::new();
        let mut f = Frontier::default();
        for h in row_hashes {
            for (idx, hash) in f.append(h) {
                debug_assert_eq!(idx as usize, out.len());
                out.push(hash);
            }
        }
        MemStore(out)
    }
}

impl Store for MemStore {
    async fn fetch(&self, indexes: &[u64]) -> Result<HashMap<u64, [u8; 32]>, sqlx::Error> {
        Ok(indexes
            .iter()
            .filter_map(|&i| self.0.get(i as usize).map(|h| (i, *h)))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};

    // An independent, naive RFC 9162 implementation (section 2.1).
    fn node(l: [u8; 32], r: [u8; 32]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([1u8]);
        h.update(l);
        h.update(r);
        h.finalize().into()
    }
    fn leaf(d: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update([0u8]);
        h.update(d);
        h.finalize().into()
    }
    fn split(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }
    fn mth(d: &[[u8; 32]]) -> [u8; 32] {
        match d.len() {
            0 => Sha256::digest(b"").into(),
            1 => leaf(&d[0]),
            n => {
                let k = split(n);
                node(mth(&d[..k]), mth(&d[k..]))
            }
        }
    }
    fn path(m: usize, d: &[[u8; 32]]) -> Vec<[u8; 32]> {
        let n = d.len();
        if n <= 1 {
            return vec![];
        }
        let k = split(n);
        if m < k {
            let mut p = path(m, &d[..k]);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = path(m - k, &d[k..]);
            p.push(mth(&d[..k]));
            p
        }
    }
    fn subproof(m: usize, d: &[[u8; 32]], b: bool) -> Vec<[u8; 32]> {
        let n = d.len();
        if m == n {
            return if b { vec![] } else { vec![mth(d)] };
        }
        let k = split(n);
        if m <= k {
            let mut p = subproof(m, &d[..k], b);
            p.push(mth(&d[k..]));
            p
        } else {
            let mut p = subproof(m - k, &d[k..], false);
            p.push(mth(&d[..k]));
            p
        }
    }

    fn rows(n: usize) -> Vec<[u8; 32]> {
        (0..n)
            .map(|i| Sha256::digest((i as u64).to_be_bytes()).into())
            .collect()
    }

    #[tokio::test]
    async fn roots_and_proofs_match_a_naive_recomputation_for_every_size_to_70() {
        let all = rows(70);
        let store = MemStore::build(&all);
        for n in 1..=70usize {
            let d = &all[..n];
            let want = mth(d);
            assert_eq!(root(&store, n as u64).await.unwrap(), want, "MTH({n})");
            let mut f = Frontier::default();
            d.iter().for_each(|h| {
                f.append(h);
            });
            assert_eq!(f.root(), want, "frontier root {n}");
            for m in 0..n {
                let p = inclusion(&store, m as u64, n as u64).await.unwrap();
                assert_eq!(p, path(m, d), "PATH({m}, D[{n}])");
                assert!(check_inclusion(&p, n as u64, want, m as u64, leaf(&d[m])));
                assert!(!check_inclusion(
                    &p,
                    n as u64,
                    want,
                    m as u64,
                    leaf(&[7; 32])
                ));
            }
            for m in 1..=n {
                let p = consistency(&store, m as u64, n as u64).await.unwrap();
                assert_eq!(p, subproof(m, d, true), "PROOF({m}, D[{n}])");
                assert!(check_consistency(
                    &p,
                    m as u64,
                    mth(&d[..m]),
                    n as u64,
                    want
                ));
                if m < n {
                    assert!(!check_consistency(
                        &p,
                        m as u64,
                        mth(&all[1..=m]),
                        n as u64,
                        want
                    ));
                }
            }
        }
    }

    #[test]
    fn frontier_and_sizes_round_trip() {
        for n in 0..200u64 {
            assert_eq!(size_from_stored(stored_hash_count(n)), Some(n));
        }
        assert_eq!(size_from_stored(2), None); // 1 leaf = 1 hash, 2 leaves = 3
        let store = MemStore::build(&rows(37));
        let f = Frontier::new(
            37,
            frontier_indexes(37)
                .into_iter()
                .map(|i| (i, store.0[i as usize]))
                .collect(),
        )
        .unwrap();
        let mut g = f.clone();
        let extra = rows(38)[37];
        let added = g.append(&extra);
        let full = MemStore::build(&rows(38));
        for (i, h) in added {
            assert_eq!(full.0[i as usize], h);
        }
    }

    #[test]
    fn leaf_hash_is_rfc9162() {
        assert_eq!(leaf_hash(&[3; 32]), leaf(&[3; 32]));
    }
}
