//! The shipped GRUB script, run by a small interpreter of the GRUB script it uses, against
//! the sim firmware's rule for every boot state: both choose the same group and leave the
//! same state.

use std::collections::HashMap;

use abide_boot::grub::SCRIPT;
use abide_boot::{GrubBootloader, GrubEnv};
use abide_core::Group;

#[derive(Debug)]
enum Stmt {
    LoadEnv(Vec<String>),
    SaveEnv(Vec<String>),
    Set(String, String),
    If(Vec<(Cond, Vec<Stmt>)>, Vec<Stmt>),
    For(String, String, Vec<Stmt>),
}

/// What an `if` tests: `[ … ]`, or whether a command succeeded.
#[derive(Debug)]
enum Cond {
    Test(Vec<String>),
    Command(Box<Stmt>),
}

/// Parses the line-oriented subset of GRUB script the file uses.
fn parse(
    lines: &mut std::iter::Peekable<std::vec::IntoIter<String>>,
    enders: &[&str],
) -> Vec<Stmt> {
    let mut out = Vec::new();
    while let Some(line) = lines.peek().cloned() {
        if enders
            .iter()
            .any(|e| line == *e || line.starts_with(&format!("{e} ")))
        {
            return out;
        }
        lines.next();
        let words = split(&line);
        match words[0].as_str() {
            "load_env" => out.push(Stmt::LoadEnv(words[1..].to_vec())),
            "save_env" => out.push(Stmt::SaveEnv(words[1..].to_vec())),
            "set" => {
                let (name, value) = words[1].split_once('=').expect("set NAME=VALUE");
                out.push(Stmt::Set(name.to_owned(), value.to_owned()));
            }
            "if" => {
                let mut arms = vec![(cond(&words), parse(lines, &["elif", "else", "fi"]))];
                let mut otherwise = Vec::new();
                loop {
                    let next = lines.next().expect("if is closed");
                    let w = split(&next);
                    match w[0].as_str() {
                        "elif" => arms.push((cond(&w), parse(lines, &["elif", "else", "fi"]))),
                        "else" => otherwise = parse(lines, &["fi"]),
                        "fi" => break,
                        other => panic!("unexpected {other}"),
                    }
                }
                out.push(Stmt::If(arms, otherwise));
            }
            "for" => {
                assert_eq!(words[2], "in");
                let list = words[3].trim_end_matches(';').to_owned();
                let body = parse(lines, &["done"]);
                assert_eq!(lines.next().as_deref(), Some("done"));
                out.push(Stmt::For(words[1].clone(), list, body));
            }
            other => panic!("the interpreter does not know {other:?}"),
        }
    }
    out
}

/// The condition of an `if`/`elif` line: the words between `[` and `]`, or a command.
fn cond(words: &[String]) -> Cond {
    assert_eq!(words.last().map(String::as_str), Some("then"));
    if let Some(open) = words.iter().position(|w| w == "[") {
        let close = words.iter().position(|w| w == "];").expect("];");
        return Cond::Test(words[open + 1..close].to_vec());
    }
    let mut command: Vec<String> = words[1..words.len() - 1].to_vec();
    let last = command.last_mut().expect("a command");
    *last = last.trim_end_matches(';').to_owned();
    match command[0].as_str() {
        "load_env" => Cond::Command(Box::new(Stmt::LoadEnv(command[1..].to_vec()))),
        "save_env" => Cond::Command(Box::new(Stmt::SaveEnv(command[1..].to_vec()))),
        other => panic!("the interpreter does not know the command {other:?} in a condition"),
    }
}

/// Splits a line into words, keeping quoted strings (with their quotes) whole.
fn split(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                word.push(c);
            }
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

struct Machine<'a> {
    vars: HashMap<String, String>,
    /// grubenv; `None` when GRUB cannot read it.
    env: Option<&'a mut GrubEnv>,
    /// `${prefix}/abide-good.env`, if readable.
    fallback: Option<GrubEnv>,
    /// Whether `save_env` fails (a grubenv GRUB cannot write).
    save_fails: bool,
}

impl Machine<'_> {
    fn expand(&self, word: &str) -> String {
        let mut s = word.trim_matches('"').to_owned();
        while let Some(start) = s.find("${") {
            let end = s[start..].find('}').expect("}") + start;
            let value = self
                .vars
                .get(&s[start + 2..end])
                .cloned()
                .unwrap_or_default();
            s.replace_range(start..=end, &value);
        }
        s
    }

    fn test(&self, words: &[String]) -> bool {
        words.split(|w| w == "-a").all(|term| match term {
            [op, w] if op == "-z" => self.expand(w).is_empty(),
            [op, w] if op == "-n" => !self.expand(w).is_empty(),
            [a, op, b] if op == "=" => self.expand(a) == self.expand(b),
            [a, op, b] if op == "!=" => self.expand(a) != self.expand(b),
            other => panic!("the interpreter does not know the test {other:?}"),
        })
    }

    /// Runs one command; whether it succeeded.
    fn command(&mut self, stmt: &Stmt) -> bool {
        match stmt {
            Stmt::LoadEnv(args) => {
                let (source, names) = match args.first().map(String::as_str) {
                    Some("-f") => {
                        assert_eq!(args[1], "${prefix}/abide-good.env");
                        (self.fallback.as_ref(), &args[2..])
                    }
                    _ => (self.env.as_deref(), &args[..]),
                };
                let Some(source) = source else {
                    return false;
                };
                let loaded: Vec<(String, String)> = names
                    .iter()
                    .filter_map(|n| source.get(n).map(|v| (n.clone(), v.to_owned())))
                    .collect();
                self.vars.extend(loaded);
                true
            }
            Stmt::SaveEnv(names) => {
                if self.save_fails {
                    return false;
                }
                let Some(env) = self.env.as_deref_mut() else {
                    return false;
                };
                for n in names {
                    let v = self.vars.get(n).cloned().unwrap_or_default();
                    env.set(n, &v).unwrap();
                }
                true
            }
            other => panic!("not a command: {other:?}"),
        }
    }

    fn run(&mut self, program: &[Stmt]) {
        for stmt in program {
            match stmt {
                Stmt::LoadEnv(_) | Stmt::SaveEnv(_) => {
                    self.command(stmt);
                }
                Stmt::Set(name, value) => {
                    let v = self.expand(value);
                    self.vars.insert(name.clone(), v);
                }
                Stmt::If(arms, otherwise) => {
                    let mut taken = None;
                    for (i, (c, _)) in arms.iter().enumerate() {
                        let holds = match c {
                            Cond::Test(words) => self.test(words),
                            Cond::Command(cmd) => self.command(cmd),
                        };
                        if holds {
                            taken = Some(i);
                            break;
                        }
                    }
                    match taken {
                        Some(i) => self.run(&arms[i].1),
                        None => self.run(otherwise),
                    }
                }
                Stmt::For(var, list, body) => {
                    for item in self.expand(list).split_whitespace() {
                        self.vars.insert(var.clone(), item.to_owned());
                        self.run(body);
                    }
                }
            }
        }
    }
}

fn program() -> Vec<Stmt> {
    let lines: Vec<String> = SCRIPT
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    let mut it = lines.into_iter().peekable();
    let program = parse(&mut it, &[]);
    assert!(it.next().is_none());
    program
}

#[test]
fn the_grub_script_chooses_exactly_as_the_sim_firmware() {
    let program = program();
    let grub = GrubBootloader::new(std::path::Path::new("grubenv"));
    let mut checked = 0;
    for state in crate::engine_states() {
        let mut env = GrubEnv::default();
        env.set("saved_entry", "kept").unwrap();
        grub.fill(&mut env, &state).unwrap();
        let mut machine = Machine {
            vars: HashMap::new(),
            env: Some(&mut env),
            fallback: None,
            save_fails: false,
        };
        machine.run(&program);
        let chosen = machine.vars.get("abide_group").cloned().unwrap_or_default();
        let default = machine.vars.get("default").cloned().unwrap_or_default();

        let mut reference = state.clone();
        let want = reference.firmware_select();
        assert_eq!(
            chosen,
            want.as_ref().map_or("", Group::as_str),
            "choice for {state:?}"
        );
        assert_eq!(
            default,
            format!("abide-{}", want.as_ref().map_or("A", Group::as_str))
        );
        assert_eq!(
            grub.state_of(&env).unwrap(),
            reference,
            "state after booting from {state:?}"
        );
        assert_eq!(env.get("saved_entry"), Some("kept"));
        checked += 1;
    }
    // 2 orders × 4 bootable combinations × 7 trial settings, less the 24 trials of an
    // unbootable group.
    assert_eq!(
        checked, 32,
        "every boot state the engine can make was checked"
    );
}

/// The fallback block the backend writes for `state`.
fn fallback_for(state: &abide_boot::BootState) -> GrubEnv {
    use abide_boot::Bootloader;
    let dir = tempfile::tempdir().unwrap();
    let grub = GrubBootloader::new(&dir.path().join("grubenv"));
    grub.store(state).unwrap();
    GrubEnv::parse(&std::fs::read(grub.fallback_path()).unwrap()).unwrap()
}

/// grubenv unreadable (missing or damaged): no trial, and the known-good group of the state
/// the backend last stored, from `abide-good.env` — not a fixed `abide-A`. Both unreadable:
/// `abide-A`.
#[test]
fn a_lost_grubenv_boots_the_known_good_group_from_the_fallback_block() {
    let program = program();
    let mut checked = 0;
    for state in crate::engine_states() {
        let Some(good) = state.good().cloned() else {
            continue;
        };
        let mut machine = Machine {
            vars: HashMap::new(),
            env: None,
            fallback: Some(fallback_for(&state)),
            save_fails: false,
        };
        machine.run(&program);
        assert_eq!(
            machine.vars.get("abide_group").map(String::as_str),
            Some(good.as_str()),
            "{state:?}"
        );
        assert_eq!(machine.vars["default"], format!("abide-{good}"));
        checked += 1;
    }
    assert!(checked >= 24, "{checked}");
    let mut nothing = Machine {
        vars: HashMap::new(),
        env: None,
        fallback: None,
        save_fails: false,
    };
    nothing.run(&program);
    assert_eq!(nothing.vars["default"], "abide-A");
}

/// A grubenv GRUB cannot write: a trial whose countdown could not be saved is not booted
/// (it would boot forever); the known-good group is, and the block is unchanged.
#[test]
fn a_trial_whose_countdown_cannot_be_saved_is_not_booted() {
    let program = program();
    let grub = GrubBootloader::new(std::path::Path::new("grubenv"));
    let mut trials = 0;
    for state in crate::engine_states() {
        let mut env = GrubEnv::default();
        grub.fill(&mut env, &state).unwrap();
        let before = env.clone();
        let mut machine = Machine {
            vars: HashMap::new(),
            env: Some(&mut env),
            fallback: None,
            save_fails: true,
        };
        machine.run(&program);
        let chosen = machine.vars.get("abide_group").cloned().unwrap_or_default();
        assert_eq!(chosen, state.good().map_or("", Group::as_str), "{state:?}");
        assert_eq!(env, before, "nothing written");
        trials += usize::from(state.trial.is_some());
    }
    assert!(trials > 0);
}
