//! The batching engine: concurrent greedy requests give the tokens they give alone; a full
//! engine refuses; a request whose listener is gone is cancelled and frees its slot; a prompt
//! that extends a finished request's tokens resumes from its cache and answers as it would
//! alone.

mod common;
use common::{fixture, Expected};
use hymba::engine::{Event, Request, SubmitError};
use hymba::{
    generate, Engine, EngineOptions, FinishReason, GenerateOptions, Model, SamplingParams,
};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

fn options(max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams::default(),
        stop: Vec::new(),
        ignore_eos: true,
        eos_id: Some(2),
        window: Default::default(),
        keep_logits: false,
    }
}

/// Up to `max_batch` sequences at once, with no prompt cache (the default).
fn batch(max_batch: usize) -> EngineOptions {
    EngineOptions {
        max_batch,
        ..Default::default()
    }
}

/// Up to `max_batch` sequences at once, with a prompt cache of `cache_bytes`.
fn cached(max_batch: usize, cache_bytes: usize) -> EngineOptions {
    EngineOptions {
        max_batch,
        prompt_cache_bytes: cache_bytes,
    }
}

/// The greedy tokens `prompt` gives alone, by `generate`.
fn alone(model: &Model, prompt: &[u32], n: usize) -> Vec<u32> {
    generate(model, None, prompt, &options(n), &mut |_| {})
        .unwrap()
        .ids
}

/// Submits `prompt` for `n` greedy tokens; its events arrive on the receiver.
fn submit(engine: &Engine, prompt: &[u32], n: usize) -> mpsc::Receiver<Event> {
    let (req, rx) = request(prompt.to_vec(), n);
    engine.submit(req).unwrap();
    rx
}

fn request(prompt: Vec<u32>, max_new_tokens: usize) -> (Request, mpsc::Receiver<Event>) {
    let (tx, rx) = mpsc::channel();
    let req = Request {
        prompt,
        options: options(max_new_tokens),
        logprobs: None,
        echo: false,
        branch_point: None,
        sink: Box::new(move |ev| tx.send(ev).is_ok()),
    };
    (req, rx)
}

/// A request's tokens, how it ended, and how many of its prompt tokens came from the prompt cache.
fn collect(rx: &mpsc::Receiver<Event>) -> (Vec<u32>, FinishReason, usize) {
    let mut ids = Vec::new();
    loop {
        match rx
            .recv_timeout(Duration::from_secs(60))
            .expect("engine answers")
        {
            Event::Token { id, .. } => ids.push(id),
            Event::Done {
                finish,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                assert_eq!(completion_tokens, ids.len());
                return (ids, finish, cached_tokens);
            }
            Event::Error(e) => panic!("engine error: {e}"),
            Event::Prompt(_) => panic!("no echo asked"),
        }
    }
}

#[test]
fn concurrent_greedy_requests_match_sequential_runs() {
    let model = Arc::new(Model::load(&fixture("tiny-a")).unwrap());
    let ids = Expected::load("tiny-a").ids("input_ids");
    let cases: Vec<(Vec<u32>, usize)> = (0..16)
        .map(|i| (ids[..3 + 2 * i].to_vec(), 3 + (i * 5) % 11))
        .collect();
    let alone: Vec<Vec<u32>> = cases.iter().map(|(p, n)| alone(&model, p, *n)).collect();
    let engine = Engine::start(model.clone(), None, batch(8));
    let rxs: Vec<_> = cases.iter().map(|(p, n)| submit(&engine, p, *n)).collect();
    for (i, rx) in rxs.iter().enumerate() {
        let (got, finish, _) = collect(rx);
        assert_eq!(got, alone[i], "request {i}");
        assert_eq!(finish, FinishReason::Length);
    }
}

#[test]
fn full_engine_refuses_and_cancelled_requests_free_their_slot() {
    let model = Arc::new(Model::load(&fixture("tiny-a")).unwrap());
    let engine = Engine::start(model, None, batch(1));
    // A listener that hangs up after the first token.
    let (tx, rx) = mpsc::channel();
    let cancel = Request {
        prompt: vec![1, 450],
        options: options(100_000),
        logprobs: None,
        echo: false,
        branch_point: None,
        // Forwards the first event, then reports nobody listens: the engine cancels it.
        sink: Box::new(move |ev| {
            let _ = tx.send(ev);
            false
        }),
    };
    let (queued, _rx2) = request(vec![1, 4996], 100_000);
    engine.submit(cancel).unwrap();
    engine.submit(queued).unwrap();
    let (third, _rx3) = request(vec![1], 1);
    assert_eq!(engine.submit(third).unwrap_err(), SubmitError::Busy);
    assert!(matches!(
        rx.recv_timeout(Duration::from_secs(30)).unwrap(),
        Event::Token { .. }
    ));
    drop(_rx2); // the queued one's listener goes too
    let t = Instant::now();
    while engine.in_flight() > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "cancelled requests were not freed"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A conversation's next turn: the last prompt, its answer, then new tokens. It resumes from the
/// last request's cache (the prompt and the answer but its last token, never fed), or from its
/// prompt's where it departs from the answer's tokens, and gives the tokens it gives alone; the
/// same prompt again resumes whole; with no prompt cache each starts afresh.
#[test]
fn next_turn_resumes_from_the_last_ones_cache() {
    let model = Arc::new(Model::load(&fixture("tiny-a")).unwrap());
    let ids = Expected::load("tiny-a").ids("input_ids");
    let alone = |p: &[u32], n: usize| alone(&model, p, n);
    for cache_bytes in [1 << 30, 0] {
        let engine = Engine::start(model.clone(), None, cached(4, cache_bytes));
        let ask = |p: &[u32], n: usize| collect(&submit(&engine, p, n));
        let first = ids[..5].to_vec();
        let (answer, _, cached) = ask(&first, 6);
        assert_eq!((answer.clone(), cached), (alone(&first, 6), 0));
        let mut next = first.clone();
        next.extend(&answer);
        next.extend(&ids[5..9]);
        let (got, _, cached) = ask(&next, 7);
        assert_eq!(
            got,
            alone(&next, 7),
            "the next turn, cache of {cache_bytes} bytes"
        );
        let want = if cache_bytes > 0 {
            first.len() + answer.len() - 1
        } else {
            0
        };
        assert_eq!(cached, want);
        let stats = engine.stats();
        use hymba::engine::Stats;
        assert_eq!(
            (
                Stats::get(&stats.prompt_cache_hits),
                Stats::get(&stats.cached_prompt_tokens)
            ),
            ((want > 0) as u64, want as u64)
        );
        // Another branch from the first prompt: the next turn's entry does not begin it, the
        // first one's does (its prompt and answer, then another message).
        let mut other = first.clone();
        other.extend(&answer[..5]);
        other.extend(&ids[9..12]);
        let (got, _, cached) = ask(&other, 4);
        assert_eq!(got, alone(&other, 4));
        assert_eq!(cached, if cache_bytes > 0 { first.len() + 5 } else { 0 });
        // A next turn whose answer encodes to other tokens than were generated: the first
        // prompt's own entry, kept when it was computed, still begins it.
        let mut edited = first.clone();
        edited.extend(&ids[12..15]);
        let (got, _, cached) = ask(&edited, 4);
        assert_eq!(got, alone(&edited, 4));
        assert_eq!(cached, if cache_bytes > 0 { first.len() } else { 0 });
        // The first prompt again (a regenerated answer): held whole with its last logits, it
        // starts with no forward and answers as before.
        let (again, _, cached) = ask(&first, 6);
        assert_eq!(again, answer);
        assert_eq!(cached, if cache_bytes > 0 { first.len() } else { 0 });
        // And with no token to generate, it ends at once.
        let (none, finish, _) = ask(&first, 0);
        assert_eq!((none.len(), finish), (0, FinishReason::Length));
    }
}

/// Answers to one prompt submitted together (as `n` asks): the prompt is computed once, the
/// others wait for it and start from its kept logits, and each answers as it would alone.
#[test]
fn one_prompt_asked_together_is_computed_once() {
    let model = Arc::new(Model::load(&fixture("tiny-a")).unwrap());
    let prompt = Expected::load("tiny-a").ids("input_ids")[..7].to_vec();
    let alone = alone(&model, &prompt, 5);
    let engine = Engine::start(model.clone(), None, cached(4, 1 << 30));
    let rxs: Vec<_> = (0..3).map(|_| submit(&engine, &prompt, 5)).collect();
    let mut cached: Vec<usize> = rxs
        .iter()
        .map(|rx| {
            let (got, _, cached) = collect(rx);
            assert_eq!(got, alone);
            cached
        })
        .collect();
    cached.sort();
    assert_eq!(cached, [0, prompt.len(), prompt.len()]);
}

/// A branch point: the prompt cache keeps the state there too, so another prompt that shares
/// only the part before it (another user's question after the same system prompt) resumes from
/// it, and each answers as it would alone.
#[test]
fn another_prompt_resumes_at_a_branch_point() {
    let model = Arc::new(Model::load(&fixture("tiny-a")).unwrap());
    let ids = Expected::load("tiny-a").ids("input_ids");
    let engine = Engine::start(model.clone(), None, cached(4, 1 << 30));
    let system = &ids[..6];
    let ask = |question: &[u32], branch_point: Option<usize>| {
        let prompt = [system, question].concat();
        let (mut req, rx) = request(prompt.clone(), 4);
        req.branch_point = branch_point;
        engine.submit(req).unwrap();
        let (got, _, cached) = collect(&rx);
        assert_eq!(got, alone(&model, &prompt, 4));
        cached
    };
    assert_eq!(ask(&ids[6..10], Some(system.len())), 0);
    assert_eq!(ask(&ids[10..13], None), system.len());
}

/// Prompts admitted together feed no more rows a step, across them, than the model takes at
/// once (here 8): the earliest admitted first, the others waiting their turn, and each answer
/// as it would be alone.
#[test]
fn a_steps_prompt_rows_stay_within_the_part() {
    let model = Arc::new(
        Model::load(&fixture("tiny-a"))
            .unwrap()
            .with_prompt_part(Some(8)),
    );
    let ids = Expected::load("tiny-a").ids("input_ids");
    let prompts: Vec<Vec<u32>> = [20, 13, 9, 17].iter().map(|&n| ids[..n].to_vec()).collect();
    let alone: Vec<Vec<u32>> = prompts.iter().map(|p| alone(&model, p, 3)).collect();
    let engine = Engine::start(model.clone(), None, batch(4));
    let rxs: Vec<_> = prompts.iter().map(|p| submit(&engine, p, 3)).collect();
    for (i, rx) in rxs.iter().enumerate() {
        assert_eq!(collect(rx).0, alone[i], "request {i}");
    }
    use hymba::engine::Stats;
    let prompt_rows: usize = prompts.iter().map(Vec::len).sum();
    assert!(Stats::get(&engine.stats().steps) as usize >= prompt_rows.div_ceil(8));
}
