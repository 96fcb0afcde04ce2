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
    If(Vec<(Vec<String>, Vec<Stmt>)>, Vec<Stmt>),
    For(String, String, Vec<Stmt>),
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

/// The words between `[` and `]` of an `if`/`elif` line.
fn cond(words: &[String]) -> Vec<String> {
    let open = words.iter().position(|w| w == "[").expect("[");
    let close = words.iter().position(|w| w == "];").expect("];");
    assert_eq!(words.last().map(String::as_str), Some("then"));
    words[open + 1..close].to_vec()
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
    env: &'a mut GrubEnv,
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

    fn run(&mut self, program: &[Stmt]) {
        for stmt in program {
            match stmt {
                Stmt::LoadEnv(names) => {
                    for n in names {
                        if let Some(v) = self.env.get(n) {
                            self.vars.insert(n.clone(), v.to_owned());
                        }
                    }
                }
                Stmt::SaveEnv(names) => {
                    for n in names {
                        let v = self.vars.get(n).cloned().unwrap_or_default();
                        self.env.set(n, &v).unwrap();
                    }
                }
                Stmt::Set(name, value) => {
                    let v = self.expand(value);
                    self.vars.insert(name.clone(), v);
                }
                Stmt::If(arms, otherwise) => match arms.iter().find(|(c, _)| self.test(c)) {
                    Some((_, body)) => self.run(body),
                    None => self.run(otherwise),
                },
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
            env: &mut env,
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
