use super::cost::{CostModel, ExtractWork, LayerCost, MeasuredCosts, Micro, Workload, BRANCH_KEYS};
use super::simulate::{simulate, simulate_traced, Bottleneck};
use super::*;
use crate::trace::Trace;

const GB: u64 = 1_000_000_000;

fn ranks(n: usize, device: u64) -> Vec<RankCaps> {
    (0..n).map(|_| RankCaps { device_bytes: device, host_bytes: None, speed: 1.0, device: "test".into() }).collect()
}

fn f180() -> ModelShape {
    ModelShape::preset("falcon-180b").unwrap()
}

fn cost(shape: &ModelShape) -> CostModel {
    CostModel::from_flops(shape, 71.0, 0.5, 24e9, 125e6, 50e-6)
}

fn work(docs: usize) -> Workload {
    Workload { docs, doc_tokens: 1500, choices: 4, choice_tokens: 4, batch_tokens: 2048, extract: None }
}

#[test]
fn falcon_180b_shape_matches_published_size() {
    let s = f180();
    assert_eq!(s.n_layers, 80);
    // ~4.4 GB per layer, ~360 GB in all (docs/DESIGN.md, "Purpose and the motivating setup").
    assert!((4.3e9..4.5e9).contains(&(s.layer_bytes as f64)), "{}", s.layer_bytes);
    assert!((355e9..365e9).contains(&(s.total_bytes() as f64)), "{}", s.total_bytes());
    for p in presets::PRESETS {
        assert!(ModelShape::preset(p).is_some(), "{p}");
    }
}

#[test]
fn groups_cover_every_layer_once_round_robin() {
    let s = Schedule::plan(&f180(), &ranks(8, 24 * GB), &ScheduleOptions::default()).unwrap();
    let mut next = 0;
    for (g, grp) in s.groups.iter().enumerate() {
        assert_eq!(grp.layers.start, next);
        assert!(!grp.layers.is_empty());
        assert_eq!(grp.owner, g % 8);
        next = grp.layers.end;
    }
    assert_eq!(next, 80);
    assert!(s.groups[0].has_begin && s.groups.last().unwrap().has_end);
    assert_eq!(s.groups.len() % 8, 0);
    for r in 0..8 {
        assert!(s.device_bytes[r] <= 24 * GB, "{}", s.describe_rank(r));
    }
}

#[test]
fn group_layers_caps_group_size_and_oversize_is_refused() {
    // Room for begin + 5 layers in one slot, as on the 24 GB cards of docs/DESIGN.md plus headroom.
    let opts = ScheduleOptions { group_layers: Some(5), resident: 1, ..Default::default() };
    let s = Schedule::plan(&f180(), &ranks(8, 28 * GB), &opts).unwrap();
    assert_eq!(s.groups.len(), 16);
    assert!(s.groups.iter().all(|g| g.layers.len() == 5));
    assert_eq!(s.describe_rank(1), format!("rank 1: layers 5-9, 45-49; resident 1; host {}; device {}", gb(s.host_bytes[1]), gb(s.device_bytes[1])));
    let too_big = ScheduleOptions { group_layers: Some(6), resident: 1, ..Default::default() };
    match Schedule::plan(&f180(), &ranks(8, 28 * GB), &too_big) {
        Err(ScheduleError::GroupTooLarge { max, requested: 6, .. }) => assert_eq!(max, 5),
        other => panic!("{other:?}"),
    }
}

#[test]
fn too_small_device_and_host_say_what_fits() {
    let e = Schedule::plan(&f180(), &ranks(8, 8 * GB), &ScheduleOptions::default()).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("--resident 1 would fit"), "{msg}");
    let mut rs = ranks(8, 24 * GB);
    rs.iter_mut().for_each(|r| r.host_bytes = Some(16 * GB));
    let msg = Schedule::plan(&f180(), &rs, &ScheduleOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("at least 23 ranks"), "{msg}");
    let msg = Schedule::plan(&f180(), &ranks(81, 24 * GB), &ScheduleOptions::default()).unwrap_err().to_string();
    assert!(msg.contains("at most 80 ranks"), "{msg}");
    let bad = ScheduleOptions { resident: 0, ..Default::default() };
    assert!(matches!(Schedule::plan(&f180(), &ranks(8, 24 * GB), &bad), Err(ScheduleError::BadOption { option: "--resident", .. })));
}

#[test]
fn faster_ranks_get_more_layers() {
    let opts = ScheduleOptions { rank_speed: Some(vec![2.0, 1.0]), group_layers: Some(4), ..Default::default() };
    let s = Schedule::plan(&f180(), &ranks(2, 48 * GB), &opts).unwrap();
    let layers = |r: usize| s.rank_groups[r].iter().map(|&g| s.groups[g].layers.len()).sum::<usize>();
    assert!(layers(0) > layers(1), "{} vs {}", layers(0), layers(1));
    assert_eq!(layers(0) + layers(1), 80);
    // Balanced: time per group within one layer's worth of each other.
    let t0 = s.groups[2].layers.len() as f64 / 2.0;
    let t1 = s.groups[3].layers.len() as f64;
    assert!((t0 - t1).abs() <= 1.0, "{t0} {t1}");
}

#[test]
fn plan_is_deterministic() {
    let a = Schedule::plan(&f180(), &ranks(8, 24 * GB), &ScheduleOptions::default()).unwrap();
    let b = Schedule::plan(&f180(), &ranks(8, 24 * GB), &ScheduleOptions::default()).unwrap();
    assert_eq!(a, b);
}

#[test]
fn work_order_zigzag_and_double_buffer() {
    let opts = ScheduleOptions { group_layers: Some(2), resident: 2, wave: Some(3), ..Default::default() };
    let s = Schedule::plan(&f180(), &ranks(8, 24 * GB), &opts).unwrap();
    let mine = s.rank_groups[0].clone();
    assert!(mine.len() > 2);
    let order = s.work_order(0, &[3, 3]);
    // Two loads up front, then all three micro-batches of the first group before the next.
    assert_eq!(order[0], Step::Load { group: mine[0], slot: 0 });
    assert_eq!(order[1], Step::Load { group: mine[1], slot: 1 });
    assert_eq!(order[2], Step::Compute { group: mine[0], wave: 0, micro: 0 });
    assert_eq!(order[4], Step::Compute { group: mine[0], wave: 0, micro: 2 });
    assert_eq!(order[5], Step::Load { group: mine[2], slot: 0 });
    let loads = order.iter().filter(|s| matches!(s, Step::Load { .. })).count();
    assert_eq!(loads, 2 * mine.len());
    assert_eq!(order.iter().filter(|s| matches!(s, Step::Compute { .. })).count(), 6 * mine.len());
    assert_eq!(s.parts_for_rank(0)[0], "begin");
    assert!(s.parts_for_rank(7).last().is_some_and(|p| p == "end"));
    assert_eq!(s.parts_for_rank(1)[0], format!("layer_{:03}", s.groups[1].layers.start));
}

#[test]
fn measured_costs_interpolate() {
    let m = MeasuredCosts::parse(r#"{"layer_seconds": [[2048, 0.1], [100, 0.01]], "h2d_bytes_per_s": 6.3e9}"#).unwrap();
    let l = LayerCost::Table(m.layer_seconds);
    assert!((l.seconds(1, 1074) - 0.055).abs() < 1e-9);
    assert!((l.seconds(1, 100) - 0.01).abs() < 1e-12);
    assert!(MeasuredCosts::parse(r#"{"layer_seconds": []}"#).is_err());
    assert!(MeasuredCosts::parse(r#"{"layer_seconds": [[0, 1]]}"#).is_err());
}

#[test]
fn waves_and_double_buffering_pay_off() {
    let shape = f180();
    let c = cost(&shape);
    let plan = |resident, wave| {
        let opts = ScheduleOptions { resident, wave: Some(wave), ..Default::default() };
        Schedule::plan(&shape, &ranks(8, 24 * GB), &opts).unwrap()
    };
    let mut c2 = c.clone();
    c2.wire_bytes = 2;
    let full = simulate(&plan(2, 32), &c2, &work(2000)).unwrap();
    let one = simulate(&plan(2, 1), &c2, &work(2000)).unwrap();
    assert!(full.docs_per_hour > 3.0 * one.docs_per_hour, "{} vs {}", full.docs_per_hour, one.docs_per_hour);
    assert_eq!(one.bottleneck, Bottleneck::Pipeline);
    // Everything computes: busy compute near the ideal of all work spread over 8 ranks.
    let busy: f64 = full.ranks.iter().map(|r| r.compute_s).sum::<f64>() / 8.0;
    assert!(busy / full.simulated_s > 0.7, "{busy} / {}", full.simulated_s);
}

#[test]
fn extrapolation_matches_full_simulation() {
    let shape = f180();
    let opts = ScheduleOptions { wave: Some(4), ..Default::default() };
    let s = Schedule::plan(&shape, &ranks(8, 24 * GB), &opts).unwrap();
    let c = cost(&shape);
    let short = simulate(&s, &c, &work(96)).unwrap(); // exactly 24 waves: simulated
    let long = simulate(&s, &c, &work(400)).unwrap(); // 100 waves: extrapolated
    assert_eq!(short.simulated_waves, short.waves);
    assert!(long.simulated_waves < long.waves);
    let rate = |r: &simulate::SimReport| r.docs_per_hour;
    assert!((rate(&long) / rate(&short) - 1.0).abs() < 0.25, "{} {}", rate(&long), rate(&short));
}

#[test]
fn single_rank_and_resident_one_run() {
    let shape = ModelShape::preset("falcon-7b").unwrap();
    let c = cost(&shape);
    for (n, resident) in [(1, 1), (1, 2), (3, 1), (4, 3)] {
        let opts = ScheduleOptions { resident, group_layers: Some(4), wave: Some(5), ..Default::default() };
        let s = Schedule::plan(&shape, &ranks(n, 16 * GB), &opts).unwrap();
        let rep = simulate(&s, &c, &work(37)).unwrap();
        assert!(rep.total_s > 0.0 && rep.docs_per_hour.is_finite(), "{n} {resident}");
    }
}

#[test]
fn trace_of_simulation_has_all_tracks() {
    let shape = f180();
    let opts = ScheduleOptions { wave: Some(8), ..Default::default() };
    let s = Schedule::plan(&shape, &ranks(8, 24 * GB), &opts).unwrap();
    let mut t = Trace::for_rank(0);
    simulate_traced(&s, &cost(&shape), &work(64), &mut t).unwrap();
    let v = t.to_json();
    let ev = v["traceEvents"].as_array().unwrap();
    for cat in ["compute", "weight copy", "send", "receive", "wait"] {
        assert!(ev.iter().any(|e| e["ph"] == "X" && e["cat"] == cat), "{cat}");
    }
    assert!(ev.iter().all(|e| e["ph"] != "X" || (e["ts"].as_f64().is_some() && e["dur"].as_f64().is_some_and(|d| d >= 0.0))));
}

#[test]
fn tuner_trades_double_buffering_against_network_hops() {
    let shape = f180();
    let pick = |net: f64| {
        let c = CostModel::from_flops(&shape, 71.0, 0.5, 24e9, net, 50e-6);
        let t = tune::tune(&shape, &ranks(8, 24 * GB), &ScheduleOptions::default(), &c, &work(100_000), true, true).unwrap();
        assert!(t.candidates.windows(2).all(|w| w[0].docs_per_hour >= w[1].docs_per_hour));
        t.schedule.resident
    };
    assert_eq!(pick(125e6), 1); // 1 GbE: bigger groups, fewer hops
    assert_eq!(pick(100e9), 2); // fast links: hide the copies
}

#[test]
fn group_counts_need_not_be_a_multiple_of_the_ranks() {
    // 80 one-layer groups on 3 ranks: 78 or 81 would be multiples, neither holds 80 layers.
    let shape = f180();
    let opts = ScheduleOptions { group_layers: Some(1), resident: 1, wave: Some(3), ..Default::default() };
    let s = Schedule::plan(&shape, &ranks(3, 24 * GB), &opts).unwrap();
    assert_eq!(s.groups.len(), 80);
    let mut next = 0;
    for (g, grp) in s.groups.iter().enumerate() {
        assert_eq!((grp.layers.start, grp.layers.len(), grp.owner), (next, 1, g % 3));
        next = grp.layers.end;
    }
    assert!(s.groups[0].has_begin && s.groups[79].has_end && s.groups[79].owner == 1);
    assert_eq!(s.rank_groups.iter().map(Vec::len).collect::<Vec<_>>(), [27, 27, 26]);
    for r in 0..3 {
        assert!(s.device_bytes[r] <= 24 * GB, "{}", s.describe_rank(r));
        let computes = s.work_order(r, &[3, 3]).iter().filter(|st| matches!(st, Step::Compute { .. })).count();
        assert_eq!(computes, 6 * s.rank_groups[r].len());
    }
    let rep = simulate(&s, &cost(&shape), &work(37)).unwrap();
    assert!(rep.total_s > 0.0 && rep.docs_per_hour.is_finite());
    // A count that is a multiple still wins where one fits: 80 layers of at most 2 on 3 ranks
    // fit 42 groups (14 per rank) before 41.
    let two = ScheduleOptions { group_layers: Some(2), ..opts };
    assert_eq!(Schedule::plan(&shape, &ranks(3, 24 * GB), &two).unwrap().groups.len(), 42);
}

#[test]
fn five_layers_in_one_layer_groups_on_two_ranks() {
    let shape = ModelShape { n_layers: 5, ..ModelShape::preset("falcon-7b").unwrap() };
    let opts = ScheduleOptions { group_layers: Some(1), resident: 1, ..Default::default() };
    let s = Schedule::plan(&shape, &ranks(2, 24 * GB), &opts).unwrap();
    assert_eq!(s.rank_groups, vec![vec![0, 2, 4], vec![1, 3]]);
    assert_eq!(s.owner(4), 0);
}

fn extract(docs: usize, tree_rows: usize, passes: usize) -> Workload {
    Workload { extract: Some(ExtractWork { tree_rows, passes }), ..work(docs) }
}

#[test]
fn extract_micro_batches_are_prompts_then_tree_rows_reading_the_kept_keys() {
    let w = extract(1000, 100, 6);
    // Pass 1: one 1500-token prompt per 2048-token micro-batch, the head on its last row only.
    assert_eq!(w.docs_per_micro(), 1);
    // Later passes: 20 rows per document and pass, 102 pieces per micro-batch: 5000 pieces.
    assert_eq!(w.micro_batches(), 1000 + 5000usize.div_ceil(102));
    let all: Vec<Micro> = (0..w.micro_batches()).map(|i| w.micro(i)).collect();
    let (prompts, trees): (Vec<&Micro>, Vec<&Micro>) = all.iter().partition(|m| m.rows == 1500);
    assert_eq!((prompts.len(), trees.len()), (1000, 5000usize.div_ceil(102)));
    assert!(prompts.iter().all(|m| m.scored == 1 && m.keys_read == 1500.0 * 1500.0));
    // A tree row attends to the prompt's keys kept from pass 1 and to its branch, and is scored.
    assert!(trees.iter().all(|m| m.rows == 2040 && m.scored == 2040 && m.keys_read == 2040.0 * (1500 + BRANCH_KEYS) as f64));
    // Both kinds in every stretch of the run, as the driver mixes passes in each wave.
    assert!(all[..64].iter().any(|m| m.rows == 2040) && all[all.len() - 64..].iter().any(|m| m.rows == 1500));
    // Over each hop a document sends its prompt once and its tree rows, not a prompt per pass.
    assert_eq!(w.rows_per_doc(), 1600);
    // A pass of more rows than --batch-tokens is cut into even pieces, one micro-batch each.
    let big = extract(10, 9000, 3);
    let trees: Vec<_> = (0..big.micro_batches()).map(|i| big.micro(i)).filter(|m| m.scored > 1).collect();
    assert_eq!((big.micro_batches(), trees.len()), (10 + 10 * 2 * 3, 10 * 2 * 3));
    assert!(trees.iter().all(|m| m.rows == 1500 && m.scored == 1500));
}

#[test]
fn extract_costs_a_prompt_and_its_tree_rows() {
    let shape = f180();
    let mut c = cost(&shape);
    c.wire_bytes = 2;
    let opts = ScheduleOptions { resident: 1, ..Default::default() };
    let s = Schedule::plan(&shape, &ranks(8, 24 * GB), &opts).unwrap();
    let score = simulate(&s, &c, &work(20_000)).unwrap();
    let small = simulate(&s, &c, &extract(20_000, 100, 6)).unwrap();
    let big = simulate(&s, &c, &extract(20_000, 2000, 3)).unwrap();
    // The prompt with 16 choice tokens vs the prompt plus 100 tree rows: a little dearer
    // than score, far from a continuation per candidate; more tree rows cost more.
    let ratio = score.docs_per_hour / small.docs_per_hour;
    assert!((1.0..2.0).contains(&ratio), "{ratio}");
    assert!(big.docs_per_hour < small.docs_per_hour, "{} {}", big.docs_per_hour, small.docs_per_hour);
    assert_eq!(small.net_bytes_per_doc, score.net_bytes_per_doc * 1600.0 / 1516.0);
    // The mix is steady from the first wave, so extrapolating from the first waves holds.
    let whole = simulate(&s, &c, &extract(600, 100, 6)).unwrap();
    assert_eq!(whole.simulated_waves, whole.waves);
    assert!(small.simulated_waves < small.waves);
    assert!((small.docs_per_hour / whole.docs_per_hour - 1.0).abs() < 0.25, "{} {}", small.docs_per_hour, whole.docs_per_hour);
}

#[test]
fn extract_refuses_what_cannot_run() {
    let context = f180().max_position;
    let msg = |w: Workload| w.check(context).unwrap_err().to_string();
    assert!(msg(extract(10, 5, 1)).contains("at least 2 passes"));
    assert!(msg(extract(10, 2, 4)).contains("a tree row per pass"));
    assert!(msg(Workload { batch_tokens: 1000, ..extract(10, 100, 6) }).contains("cannot hold one document's prompt (1500 tokens)"));
    assert!(extract(10, 100, 6).check(context).is_ok());
}
