//! The schedule book: stored atomically and read back whole, the oldest due schedule first,
//! and only the last ended ones kept.

use abide_agent::book::{Book, KEEP_ENDED};
use abide_core::schedule::{Origin, Rollback, Schedule, Source, When};
use jiff::Timestamp;

fn at(s: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + s).unwrap()
}

fn add(book: &mut Book, when: When, now: Timestamp) -> String {
    let s = Schedule::new(
        &book.next_id(),
        Source::File("/srv/os.abide".into()),
        None,
        when,
        Rollback::Automatic,
        Origin::Operator,
        now,
    )
    .unwrap();
    let id = s.id.clone();
    book.add(s);
    id
}

#[test]
fn the_oldest_due_schedule_goes_first_and_the_book_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let mut book = Book::load(dir.path()).unwrap();
    assert!(book.schedules.is_empty());
    let later = add(&mut book, When::At(at(100)), at(0));
    let window = add(&mut book, When::InWindow, at(1));
    let now = add(&mut book, When::Now, at(2));
    assert_eq!(
        (later.as_str(), window.as_str(), now.as_str()),
        ("s1", "s2", "s3")
    );
    assert_eq!(book.due(at(3), false).map(|s| s.id.as_str()), Some("s3"));
    assert_eq!(book.due(at(3), true).map(|s| s.id.as_str()), Some("s2"));
    assert_eq!(book.due(at(100), true).map(|s| s.id.as_str()), Some("s1"));
    book.get_mut("s3").unwrap().start(at(4)).unwrap();
    assert_eq!(book.in_progress().map(|s| s.id.as_str()), Some("s3"));
    book.store(dir.path()).unwrap();
    assert_eq!(Book::load(dir.path()).unwrap(), book);
    // A file that is not a schedule list is an error that names it, not an empty book.
    std::fs::write(Book::path(dir.path()), b"{\"format\": 1, \"next\": ").unwrap();
    let e = Book::load(dir.path()).unwrap_err().to_string();
    assert!(
        e.contains("schedules.json") && e.contains("not a schedule list"),
        "{e}"
    );
}

#[test]
fn only_the_last_ended_schedules_are_kept() {
    let mut book = Book::default();
    let pending = add(&mut book, When::At(at(10_000)), at(0));
    for i in 0..KEEP_ENDED + 5 {
        let id = add(&mut book, When::Now, at(i as i64));
        book.get_mut(&id)
            .unwrap()
            .cancel(at(i as i64), None)
            .unwrap();
    }
    // One more add drops the oldest ended ones past the limit, never a pending one.
    add(&mut book, When::Now, at(20_000));
    let ended = book
        .schedules
        .iter()
        .filter(|s| s.state.is_terminal())
        .count();
    assert_eq!(ended, KEEP_ENDED);
    assert!(book.get(&pending).is_some());
    assert!(book.get("s2").is_none(), "the oldest ended one is gone");
    assert_eq!(book.next_id(), format!("s{}", KEEP_ENDED + 8));
}
