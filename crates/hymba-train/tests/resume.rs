//! A training run stopped after a checkpoint and resumed ends with exactly the weights (and
//! history) of an uninterrupted run: batches are drawn per step from the seed, and the
//! checkpoint holds the parameters, both Adam moments and the step.

use hymba::kernels::testing::Rng;
use hymba::Config;
use hymba_train::data::Corpus;
use hymba_train::presets::preset;
use hymba_train::{train, Progress, Start, TrainOptions};

fn temp_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("hymba-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let config = Config::from_value(preset("micro", 64).unwrap()).unwrap();
    // A corpus with structure (a repeating pattern with noise), so the loss moves.
    let mut rng = Rng::new(1);
    let stream: Vec<u32> = (0..4000)
        .map(|i| {
            if rng.below(4) == 0 {
                rng.below(64) as u32
            } else {
                (i % 17) as u32 + 3
            }
        })
        .collect();
    let corpus = Corpus {
        train: stream[..3500].to_vec(),
        valid: stream[3500..].to_vec(),
    };
    let options = TrainOptions {
        steps: 6,
        batch: 2,
        seq_len: 24,
        warmup: 2,
        eval_every: 2,
        eval_batches: 2,
        save_every: 3,
        ..Default::default()
    };
    let quiet = &mut |_: Progress| {};

    let whole_dir = temp_dir("whole");
    let whole = train(
        &whole_dir,
        &config,
        &corpus,
        &options,
        Start::Scratch,
        None,
        quiet,
    )
    .unwrap();
    assert_eq!(whole.step, 6);
    let first = whole.history.train[0].1;
    let last = whole.history.train[5].1;
    assert!(
        last < first,
        "the loss should fall over six steps: {first} -> {last}"
    );

    let split_dir = temp_dir("split");
    let part = train(
        &split_dir,
        &config,
        &corpus,
        &options,
        Start::Scratch,
        Some(4),
        quiet,
    )
    .unwrap();
    assert_eq!(part.step, 4);
    // Resuming starts from the step-3 checkpoint, as after a kill during step 4.
    let mut resumed_at = None;
    let rest = train(
        &split_dir,
        &config,
        &corpus,
        &options,
        Start::Resume,
        None,
        &mut |p| {
            if let Progress::Resumed { step, .. } = p {
                resumed_at = Some(step);
            }
        },
    )
    .unwrap();
    assert_eq!(resumed_at, Some(3));
    assert_eq!(rest.step, 6);
    assert!(
        whole.params.data == rest.params.data,
        "resumed weights differ from the uninterrupted run's"
    );
    assert_eq!(whole.history.train, rest.history.train);
    assert_eq!(whole.history.valid, rest.history.valid);

    // Other options are refused on resume, naming the checkpoint.
    let other = TrainOptions {
        lr: 1e-2,
        ..options.clone()
    };
    let err = train(
        &split_dir,
        &config,
        &corpus,
        &other,
        Start::Resume,
        None,
        quiet,
    )
    .err()
    .expect("refused")
    .to_string();
    assert!(err.contains("checkpoint.safetensors"), "{err}");
    for d in [whole_dir, split_dir] {
        std::fs::remove_dir_all(d).unwrap();
    }
}
