//! The shipped U-Boot script (`uboot/abide.env`, `abide_select`), run by a small interpreter of
//! the hush-shell subset it uses, against the sim firmware's rule for every boot state: both
//! choose the same group and leave the same state.

use std::collections::HashMap;

use abide_boot::uboot::SCRIPT;
use abide_core::Group;

#[derive(Debug)]
enum Stmt {
    Simple(Vec<String>),
    If(Vec<(String, Vec<Stmt>)>, Vec<Stmt>),
    For(String, String, Vec<Stmt>),
}

/// The script's statements, `;`-separated, with `then `, `do ` and `else ` prefixes split off.
fn tokens() -> Vec<String> {
    let line = SCRIPT
        .lines()
        .find_map(|l| l.strip_prefix("abide_select="))
        .expect("abide_select is defined");
    let mut out = Vec::new();
    for part in line.split(';').map(str::trim).filter(|p| !p.is_empty()) {
        let mut rest = part;
        loop {
            if let Some(r) = rest
                .strip_prefix("then ")
                .or_else(|| rest.strip_prefix("do "))
                .or_else(|| rest.strip_prefix("else "))
            {
                out.push(rest[..rest.len() - r.len()].trim().to_owned());
                rest = r.trim();
            } else {
                out.push(rest.to_owned());
                break;
            }
        }
    }
    out
}

fn parse(
    tokens: &mut std::iter::Peekable<std::vec::IntoIter<String>>,
    enders: &[&str],
) -> Vec<Stmt> {
    let mut out = Vec::new();
    while let Some(tok) = tokens.peek().cloned() {
        let word = tok.split_whitespace().next().unwrap_or_default().to_owned();
        if enders.contains(&word.as_str()) {
            return out;
        }
        tokens.next();
        match word.as_str() {
            "if" => {
                let mut arms = Vec::new();
                let mut cond = tok["if ".len()..].to_owned();
                let mut otherwise = Vec::new();
                loop {
                    assert_eq!(tokens.next().as_deref(), Some("then"), "if … then");
                    arms.push((cond.clone(), parse(tokens, &["elif", "else", "fi"])));
                    let next = tokens.next().expect("if is closed");
                    if let Some(c) = next.strip_prefix("elif ") {
                        cond = c.to_owned();
                        continue;
                    }
                    if next == "else" {
                        otherwise = parse(tokens, &["fi"]);
                        assert_eq!(tokens.next().as_deref(), Some("fi"));
                    } else {
                        assert_eq!(next, "fi");
                    }
                    break;
                }
                out.push(Stmt::If(arms, otherwise));
            }
            "for" => {
                let words: Vec<&str> = tok.split_whitespace().collect();
                assert_eq!(words[2], "in");
                assert_eq!(tokens.next().as_deref(), Some("do"));
                let body = parse(tokens, &["done"]);
                assert_eq!(tokens.next().as_deref(), Some("done"));
                out.push(Stmt::For(words[1].to_owned(), words[3..].join(" "), body));
            }
            _ => out.push(Stmt::Simple(
                tok.split_whitespace().map(str::to_owned).collect(),
            )),
        }
    }
    out
}

struct Shell {
    env: HashMap<String, String>,
    /// What `run abide_save` stored last (the variables of the script), if it succeeded.
    saved: Option<HashMap<String, String>>,
    /// Whether saving fails (an environment U-Boot cannot write).
    save_fails: bool,
}

impl Shell {
    fn expand(&self, word: &str) -> String {
        let mut s = word.trim_matches('"').to_owned();
        while let Some(start) = s.find("${") {
            let end = s[start..].find('}').expect("}") + start;
            let value = self
                .env
                .get(&s[start + 2..end])
                .cloned()
                .unwrap_or_default();
            s.replace_range(start..=end, &value);
        }
        s
    }

    /// `run abide_save`: the default `saveenv` of the script.
    fn save(&mut self) -> bool {
        if self.save_fails {
            return false;
        }
        self.saved = Some(self.env.clone());
        true
    }

    fn test(&mut self, cond: &str) -> bool {
        if cond.trim() == "run abide_save" {
            return self.save();
        }
        cond.split("&&").all(|t| {
            let words: Vec<&str> = t.split_whitespace().collect();
            assert_eq!(words[0], "test", "{t}");
            match &words[1..] {
                ["-n", w] => !self.expand(w).is_empty(),
                ["-z", w] => self.expand(w).is_empty(),
                [a, "=", b] => self.expand(a) == self.expand(b),
                [a, "!=", b] => self.expand(a) != self.expand(b),
                other => panic!("the interpreter does not know test {other:?}"),
            }
        })
    }

    fn run(&mut self, program: &[Stmt]) {
        for stmt in program {
            match stmt {
                Stmt::Simple(words) => match words[0].as_str() {
                    "setenv" if words.len() == 2 => {
                        self.env.remove(&words[1]);
                    }
                    "setenv" => {
                        let v = words[2..]
                            .iter()
                            .map(|w| self.expand(w))
                            .collect::<Vec<_>>()
                            .join(" ");
                        self.env.insert(words[1].clone(), v);
                    }
                    "run" if words[1..] == ["abide_save"] => {
                        self.save();
                    }
                    other => panic!("the interpreter does not know {other}"),
                },
                Stmt::If(arms, otherwise) => {
                    let mut taken = None;
                    for (i, (c, _)) in arms.iter().enumerate() {
                        if self.test(c) {
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
                    for item in self
                        .expand(list)
                        .split_whitespace()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                    {
                        self.env.insert(var.clone(), item);
                        self.run(body);
                    }
                }
            }
        }
    }
}

/// The shell after `abide_select` ran on the variables the backend writes for `state`.
fn booted(program: &[Stmt], state: &abide_boot::BootState, save_fails: bool) -> Shell {
    let groups = [Group::new("A").unwrap(), Group::new("B").unwrap()];
    let mut env = HashMap::new();
    abide_boot::grub::state_to_env(&groups, state, |n, v| {
        env.insert(n.to_owned(), v.to_owned());
        Ok(())
    })
    .unwrap();
    let mut shell = Shell {
        env,
        saved: None,
        save_fails,
    };
    shell.run(program);
    shell
}

#[test]
fn the_uboot_script_chooses_exactly_as_the_sim_firmware() {
    let mut it = tokens().into_iter().peekable();
    let program = parse(&mut it, &[]);
    assert!(it.next().is_none());
    let groups = [Group::new("A").unwrap(), Group::new("B").unwrap()];
    let path = std::path::Path::new("env");
    let mut checked = 0;
    for state in crate::engine_states() {
        let shell = booted(&program, &state, false);
        assert_eq!(
            shell.saved.as_ref(),
            Some(&shell.env),
            "the script saves the environment last"
        );
        let mut reference = state.clone();
        let want = reference.firmware_select();
        let chosen = shell.env.get("abide_group").cloned().unwrap_or_default();
        assert_eq!(
            chosen,
            want.as_ref().map_or("", Group::as_str),
            "choice for {state:?}"
        );
        let after =
            abide_boot::grub::env_to_state(path, &groups, |n| shell.env.get(n).map(String::as_str))
                .unwrap();
        assert_eq!(after, reference, "state after booting from {state:?}");
        checked += 1;
    }
    assert_eq!(checked, 32);
}

/// An environment U-Boot cannot write: a trial whose countdown could not be saved is not
/// booted (it would boot forever); the known-good group is.
#[test]
fn a_trial_whose_countdown_cannot_be_saved_is_not_booted() {
    let mut it = tokens().into_iter().peekable();
    let program = parse(&mut it, &[]);
    let mut trials = 0;
    for state in crate::engine_states() {
        let shell = booted(&program, &state, true);
        assert_eq!(shell.saved, None);
        assert_eq!(
            shell
                .env
                .get("abide_group")
                .map(String::as_str)
                .unwrap_or(""),
            state.good().map_or("", Group::as_str),
            "{state:?}"
        );
        trials += usize::from(state.trial.is_some());
    }
    assert!(trials > 0);
}
