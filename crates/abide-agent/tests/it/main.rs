//! The agent's parts against real files.

mod audit;
mod config;
mod health;
mod schedules;
