//! Burst mode (`CONCURRENT=N`, issue 16 point 4): N pods of one variant started at once on the
//! warm node, variants alternated round by round (A B, then B A, ...).
//!
//! Per round and variant: N RunPodSandbox at once (timed on their own, per pod and for all N),
//! then, once every sandbox exists, N tasks released together, each timing its own pod from its
//! CreateContainer call to its own first HTTP 200 (the same timed part as a single sample). The
//! wall time from the first CreateContainer call to the last answer is recorded too. Every
//! answer is checked (the lock's message, exactly the closure under `/nix/store`). Then all N
//! pods are stopped and removed and the bench waits for every shim to exit, outside the timing.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use nixenv_testkit::cri::{ContainerSpec, PodSpec};
use nixenv_testkit::fixtures::EchoReply;
use nixenv_testkit::free_port;
use tokio::task::JoinSet;

use super::{
    check_reply, create_start_answer, labels, median, pct, pod_of, print_machine, sorted_ms,
    uptime, Bench, Sample, Variant,
};

/// How long the shims of N pods may take to exit after the pods are removed.
const SHIMS_EXIT: Duration = Duration::from_secs(60);

/// One burst of one variant.
struct Burst {
    /// One per pod, `sandbox` set.
    samples: Vec<Sample>,
    /// All N RunPodSandbox, from the first call to the last return.
    sandboxes: Duration,
    /// From the first CreateContainer call to the last first answer.
    answered: Duration,
}

/// `n` distinct free ports on 127.0.0.1 (the pods share the host network).
fn ports(n: usize) -> Vec<u16> {
    let mut set = BTreeSet::new();
    while set.len() < n {
        set.insert(free_port());
    }
    set.into_iter().collect()
}

impl Bench {
    /// Starts `n` pods of `v` at once; checks every answer; removes the pods.
    async fn burst(&mut self, v: &Variant, n: usize) -> anyhow::Result<Burst> {
        let pods: Vec<_> = ports(n)
            .into_iter()
            .map(|port| {
                self.round += 1;
                (pod_of(v, self.round, port), port)
            })
            .collect();

        let t0 = Instant::now();
        let mut set = JoinSet::new();
        for (i, ((pod, _), _)) in pods.iter().enumerate() {
            let (mut cri, pod) = (self.cri.clone(), pod.clone());
            set.spawn(async move {
                let t = Instant::now();
                (i, cri.run_pod(&pod).await, t.elapsed())
            });
        }
        let mut ids: Vec<Option<String>> = vec![None; n];
        let mut sandbox = vec![Duration::ZERO; n];
        let mut failed = None;
        while let Some(joined) = set.join_next().await {
            let (i, id, took) = joined?;
            match id {
                Ok(id) => (ids[i], sandbox[i]) = (Some(id), took),
                Err(e) => failed = Some(format!("{}: RunPodSandbox: {}", v.label, e.message())),
            }
        }
        let sandboxes = t0.elapsed();

        let started = match failed {
            Some(e) => Err(anyhow::anyhow!(e)),
            None => self.start_all(v, &pods, &ids).await,
        };
        let removed = self.remove_all(&ids).await;
        let (samples, replies, answered) = started.inspect_err(|_| self.print_log_tail())?;
        removed.with_context(|| format!("{}: delete pods", v.label))?;
        for reply in &replies {
            check_reply(v, reply)?;
        }
        self.wait_shims_gone(v.label, SHIMS_EXIT).await?;
        let samples = samples
            .into_iter()
            .zip(sandbox)
            .map(|(s, sandbox)| Sample { sandbox, ..s })
            .collect();
        Ok(Burst {
            samples,
            sandboxes,
            answered,
        })
    }

    /// The timed part for every pod at once: tasks released together by a barrier.
    async fn start_all(
        &self,
        v: &Variant,
        pods: &[((PodSpec, ContainerSpec), u16)],
        ids: &[Option<String>],
    ) -> anyhow::Result<(Vec<Sample>, Vec<EchoReply>, Duration)> {
        let n = pods.len();
        let barrier = Arc::new(tokio::sync::Barrier::new(n));
        let mut set = JoinSet::new();
        for (i, ((pod, port), id)) in pods.iter().zip(ids).enumerate() {
            let id = id.clone().context("a sandbox without id")?;
            let (mut cri, pod, port, label) = (self.cri.clone(), pod.clone(), *port, v.label);
            let barrier = barrier.clone();
            set.spawn(async move {
                barrier.wait().await;
                let t = Instant::now();
                let r = create_start_answer(&mut cri, label, &id, &pod, port).await;
                (i, t, r.map(|(s, reply)| (t + s.container(), s, reply)))
            });
        }
        let mut out: Vec<Option<(Sample, EchoReply)>> = vec![None; n];
        let (mut first, mut last) = (None::<Instant>, None::<Instant>);
        let mut failed = None;
        while let Some(joined) = set.join_next().await {
            let (i, began, r) = joined?;
            first = Some(first.map_or(began, |f| f.min(began)));
            match r {
                Ok((done, s, reply)) => {
                    last = Some(last.map_or(done, |l| l.max(done)));
                    out[i] = Some((s, reply));
                }
                Err(e) => failed = Some(e),
            }
        }
        if let Some(e) = failed {
            return Err(e);
        }
        let answered = last.zip(first).map(|(l, f)| l - f).unwrap_or_default();
        let (samples, replies) = out.into_iter().flatten().unzip();
        Ok((samples, replies, answered))
    }

    /// Stops and removes every pod that was created, all at once.
    async fn remove_all(&self, ids: &[Option<String>]) -> anyhow::Result<()> {
        let mut set = JoinSet::new();
        for id in ids.iter().flatten() {
            let (mut cri, id) = (self.cri.clone(), id.clone());
            set.spawn(async move { cri.delete_pod(&id).await.map_err(|e| (id, e)) });
        }
        let mut failed = None;
        while let Some(joined) = set.join_next().await {
            if let Err((id, e)) = joined? {
                failed = Some(anyhow::anyhow!("pod {id}: {}", e.message()));
            }
        }
        failed.map_or(Ok(()), Err)
    }
}

/// `ms` to one decimal.
fn ms(d: f64) -> String {
    format!("{d:.1}")
}

/// Runs `rounds` rounds of `n` pods per variant and prints the table and the ratios.
pub(super) async fn run(
    bench: &mut Bench,
    variants: &[Variant],
    n: usize,
    rounds: usize,
) -> anyhow::Result<()> {
    eprintln!("== warm-up burst of {n} pods per variant (untimed)");
    for v in variants {
        bench.burst(v, n).await?;
    }
    let load_before = uptime();
    eprintln!(
        "== {rounds} rounds of {n} pods at once of {} ({load_before})",
        labels(variants)
    );
    let mut bursts: Vec<Vec<Burst>> = variants.iter().map(|_| Vec::new()).collect();
    for r in 0..rounds {
        let mut order: Vec<usize> = (0..variants.len()).collect();
        if r % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let b = bench.burst(&variants[i], n).await?;
            eprintln!(
                "   round {}: {} all {n} answered in {:.0} ms",
                r + 1,
                variants[i].label,
                b.answered.as_secs_f64() * 1e3
            );
            bursts[i].push(b);
        }
    }
    let load_after = uptime();

    print_machine(&load_before, &load_after);
    println!(
        "{n} pods started at once per round, {rounds} rounds, variants alternated; \
         {} pods per variant; ms",
        n * rounds
    );
    println!();
    println!("| variant | closure paths | RunPodSandbox median | CreateContainer median | StartContainer median | start→answer median | **Create+Start→answer median** | p90 | **p99** | max | all {n} sandboxes, median | all {n} answered (first Create → last answer), median (max) |");
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let mut heads = Vec::new();
    for (v, bs) in variants.iter().zip(&bursts) {
        let all: Vec<Sample> = bs.iter().flat_map(|b| b.samples.iter().copied()).collect();
        let total = sorted_ms(&all, Sample::container);
        let wall = |f: fn(&Burst) -> Duration| {
            let mut w: Vec<f64> = bs.iter().map(|b| f(b).as_secs_f64() * 1e3).collect();
            w.sort_by(|a, b| a.total_cmp(b));
            w
        };
        let (sandboxes, answered) = (wall(|b| b.sandboxes), wall(|b| b.answered));
        let phase = |f: fn(&Sample) -> Duration| ms(median(&sorted_ms(&all, f)));
        println!(
            "| {} | {} | {} | {} | {} | {} | **{}** | {} | **{}** | {} | {} | {} ({}) |",
            v.label,
            v.store_len,
            phase(|s| s.sandbox),
            phase(|s| s.create),
            phase(|s| s.start),
            phase(|s| s.answer),
            ms(median(&total)),
            ms(pct(&total, 90.0)),
            ms(pct(&total, 99.0)),
            ms(total[total.len() - 1]),
            ms(median(&sandboxes)),
            ms(median(&answered)),
            ms(answered[answered.len() - 1]),
        );
        heads.push((
            median(&total),
            pct(&total, 99.0),
            median(&answered),
            median(&sorted_ms(&all, |s| s.start)),
        ));
    }
    println!();
    let verdict = |r: f64| if r <= 1.10 { "met" } else { "missed" };
    let (a, b) = (heads[0], heads[1]);
    println!(
        "A/B (nixenv/runc), Create+Start→answer of {n} pods at once: ratio of medians {:.3} \
         (goal <= 1.10: {}), ratio of p99 {:.3} (goal <= 1.10: {})",
        a.0 / b.0,
        verdict(a.0 / b.0),
        a.1 / b.1,
        verdict(a.1 / b.1)
    );
    println!(
        "A/B (nixenv/runc), all {n} answered, ratio of medians: {:.3}",
        a.2 / b.2
    );
    println!(
        "A/B (nixenv/runc), StartContainer (where the shim prepares the closure), ratio of \
         medians: {:.3}",
        a.3 / b.3
    );
    if let Some(d) = heads.get(2) {
        println!(
            "D/A ({} paths / {} paths), Create+Start→answer: ratio of medians {:.3}, of p99 {:.3}",
            variants[2].store_len,
            variants[0].store_len,
            d.0 / a.0,
            d.1 / a.1
        );
    }
    Ok(())
}
