//! The gRPC service `abide agent` serves on its socket, over the state it shares with the
//! agent's loop (`crate::shared::Shared`).
//!
//! Handlers that read or change the device run on blocking threads. A handler that changes
//! the device takes its lock without waiting: while the loop holds it (a download), it answers
//! UNAVAILABLE rather than hang.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use abide_agent_api as pb;
use abide_agent_api::agent_server::Agent;
use abide_core::schedule::{Origin, Rollback, Schedule, ScheduleState, Source, When};
use tokio::sync::broadcast;
use tonic::codegen::tokio_stream::Stream;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::device::Device;
use crate::error::AgentError;
use crate::shared::{Shared, event};
use crate::state::DeviceRecord;

/// The service.
pub struct Service {
    shared: Arc<Shared>,
}

impl Service {
    /// The service over what it shares with the agent's loop.
    pub fn new(shared: Arc<Shared>) -> Service {
        Service { shared }
    }
}

/// The gRPC status an agent error answers with.
fn status_of(e: AgentError) -> Status {
    match &e {
        AgentError::Locked { .. } => Status::unavailable(e.to_string()),
        AgentError::Core(_) | AgentError::Busy { .. } => Status::failed_precondition(e.to_string()),
        _ if e.is_refusal() => Status::failed_precondition(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

/// Runs `f` on a blocking thread.
async fn blocking<R: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<R, Status> + Send + 'static,
) -> std::result::Result<Response<R>, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("the handler failed: {e}")))?
        .map(Response::new)
}

type Answer<T> = std::result::Result<Response<T>, Status>;

#[tonic::async_trait]
impl Agent for Service {
    async fn status(&self, _: Request<pb::StatusRequest>) -> Answer<pb::Status> {
        let shared = self.shared.clone();
        blocking(move || {
            let device = Device::open_read_only(shared.config.clone()).map_err(status_of)?;
            let mut status = super::status(&device).map_err(status_of)?;
            status.started = shared.started.to_string();
            status.pid = std::process::id();
            status.schedule = shared
                .book()
                .in_progress()
                .map(|s| s.id.clone())
                .unwrap_or_default();
            Ok(status)
        })
        .await
    }

    async fn schedule_update(
        &self,
        request: Request<pb::ScheduleUpdateRequest>,
    ) -> Answer<pb::Schedule> {
        let r = request.into_inner();
        let shared = self.shared.clone();
        blocking(move || {
            let invalid = |e: &dyn std::fmt::Display| Status::invalid_argument(e.to_string());
            let source = Source::parse(&r.source).map_err(|e| invalid(&e))?;
            if let Source::File(f) = &source
                && !std::path::Path::new(f).is_file()
            {
                return Err(Status::invalid_argument(format!(
                    "source {f:?}: no such file on the device"
                )));
            }
            let when = match (r.at.as_str(), r.in_window) {
                ("", false) => When::Now,
                ("", true) => When::InWindow,
                (at, false) => When::At(at.parse().map_err(|e| {
                    Status::invalid_argument(format!(
                        "at {at:?}: expected an RFC 3339 time such as 2026-12-24T02:00:00Z ({e})"
                    ))
                })?),
                (_, true) => {
                    return Err(Status::invalid_argument(
                        "give a time (at) or the next window (in_window), not both",
                    ));
                }
            };
            if when == When::InWindow && shared.config.windows.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "the device has no maintenance window: add a [[window]] to {}",
                    shared.config.path.display()
                )));
            }
            let rollback = if r.no_auto_rollback {
                Rollback::Manual
            } else {
                Rollback::Automatic
            };
            let sha256 = Some(r.sha256.as_str()).filter(|s| !s.is_empty());
            let now = shared.clock.now();
            let made = shared
                .with_book(|b| {
                    let s = Schedule::new(
                        &b.next_id(),
                        source,
                        sha256,
                        when,
                        rollback,
                        Origin::Operator,
                        now,
                    )?;
                    b.add(s.clone());
                    Ok::<_, abide_core::schedule::ScheduleError>(s)
                })
                .map_err(status_of)?
                .map_err(|e| invalid(&e))?;
            tracing::info!(schedule = %made.id, "update scheduled");
            shared.wake();
            Ok(super::schedule(&made))
        })
        .await
    }

    async fn get_schedule(&self, request: Request<pb::GetScheduleRequest>) -> Answer<pb::Schedule> {
        let id = request.into_inner().id;
        match self.shared.book().get(&id) {
            Some(s) => Ok(Response::new(super::schedule(s))),
            None => Err(Status::not_found(format!("no schedule {id:?}"))),
        }
    }

    async fn list_schedules(
        &self,
        _: Request<pb::ListSchedulesRequest>,
    ) -> Answer<pb::ListSchedulesResponse> {
        let book = self.shared.book();
        Ok(Response::new(pb::ListSchedulesResponse {
            schedules: book.schedules.iter().rev().map(super::schedule).collect(),
        }))
    }

    async fn cancel_schedule(
        &self,
        request: Request<pb::CancelScheduleRequest>,
    ) -> Answer<pb::Schedule> {
        let id = request.into_inner().id;
        let shared = self.shared.clone();
        blocking(move || {
            let now = shared.clock.now();
            let state = DeviceRecord::load(&shared.config.state_dir).map_err(status_of)?;
            let done = shared
                .with_book(|b| {
                    let Some(s) = b.get_mut(&id) else {
                        return Err(Status::not_found(format!("no schedule {id:?}")));
                    };
                    if let Origin::Fleet { rollout } = &s.origin {
                        return Err(Status::failed_precondition(format!(
                            "schedule {id} carries out rollout {rollout}: the fleet decides (pause or abort the rollout on the server)"
                        )));
                    }
                    if let Some(t) = s
                        .transaction
                        .as_deref()
                        .filter(|t| t.starts_with(abide_core::app::ID_PREFIX))
                        .filter(|_| matches!(s.state, ScheduleState::InProgress { .. }))
                    {
                        return Err(Status::failed_precondition(format!(
                            "schedule {id} is updating an application (transaction {t}): too late to cancel; a failed step or health check brings the previous release back, and `abide backup restore` puts a backup back"
                        )));
                    }
                    // The schedule in progress owns the device's transaction while it runs.
                    let tx = state
                        .transaction
                        .as_ref()
                        .filter(|t| !t.state.is_terminal())
                        .filter(|_| matches!(s.state, ScheduleState::InProgress { .. }));
                    if let Some(t) = tx {
                        s.transaction = Some(t.id.clone());
                        if let ScheduleState::InProgress { transaction } = &mut s.state {
                            *transaction = Some(t.id.clone());
                        }
                    }
                    let stop = s
                        .cancel(now, tx.map(|t| &t.state))
                        .map_err(|e| Status::failed_precondition(e.to_string()))?;
                    Ok((super::schedule(s), stop))
                })
                .map_err(status_of)??;
            let (view, stop) = done;
            if stop {
                shared.stop.store(true, Ordering::SeqCst);
            }
            tracing::info!(schedule = %view.id, stop, "schedule cancelled");
            shared.wake();
            Ok(view)
        })
        .await
    }

    async fn get_health(&self, _: Request<pb::GetHealthRequest>) -> Answer<pb::Health> {
        let shared = self.shared.clone();
        blocking(move || {
            let device = Device::open_read_only(shared.config.clone()).map_err(status_of)?;
            super::health(&device, shared.clock.as_ref()).map_err(status_of)
        })
        .await
    }

    async fn trigger_rollback(
        &self,
        request: Request<pb::TriggerRollbackRequest>,
    ) -> Answer<pb::TriggerRollbackResponse> {
        let reason = request.into_inner().reason;
        let reason = if reason.trim().is_empty() {
            "operator request".to_owned()
        } else {
            reason.chars().take(1000).collect()
        };
        let shared = self.shared.clone();
        blocking(move || {
            let mut device = Device::open(shared.config.clone()).map_err(status_of)?;
            let now = shared.clock.now();
            let (tx, reboot) = device
                .advance(now, "roll back", |tx| tx.rollback(now, &reason))
                .map_err(status_of)?;
            tracing::info!(transaction = %tx.id, %reason, "rolled back through the API");
            let answer = pb::TriggerRollbackResponse {
                transaction: tx.id.clone(),
                state: tx.state.name().to_owned(),
                reboot,
            };
            shared.wake();
            if reboot {
                device.reboot().map_err(status_of)?;
            }
            Ok(answer)
        })
        .await
    }

    async fn get_rollback_history(
        &self,
        _: Request<pb::GetRollbackHistoryRequest>,
    ) -> Answer<pb::RollbackHistory> {
        let shared = self.shared.clone();
        blocking(move || super::rollback_history(&shared.config).map_err(status_of)).await
    }

    async fn get_audit_log(
        &self,
        request: Request<pb::GetAuditLogRequest>,
    ) -> Answer<pb::AuditLog> {
        let r = request.into_inner();
        let shared = self.shared.clone();
        blocking(move || super::audit_log(&shared.config, r.after, r.limit).map_err(status_of))
            .await
    }

    type WatchProgressStream =
        Pin<Box<dyn Stream<Item = std::result::Result<pb::ProgressEvent, Status>> + Send>>;

    async fn watch_progress(
        &self,
        request: Request<pb::WatchProgressRequest>,
    ) -> Answer<Self::WatchProgressStream> {
        let id = request.into_inner().schedule;
        let mut events = self.shared.subscribe();
        let first = if id.is_empty() {
            None
        } else {
            let book = self.shared.book();
            let s = book
                .get(&id)
                .ok_or_else(|| Status::not_found(format!("no schedule {id:?}")))?;
            let tx = DeviceRecord::load(&self.shared.config.state_dir)
                .ok()
                .and_then(|s| s.transaction);
            Some((
                event(s, tx.as_ref(), 0, 0, self.shared.clock.now()),
                s.state.is_terminal(),
            ))
        };
        let (send, receive) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            if let Some((e, ended)) = first {
                if send.send(Ok(e)).await.is_err() || ended {
                    return;
                }
            }
            loop {
                match events.recv().await {
                    Ok(e) if id.is_empty() || e.schedule == id => {
                        let ended = !id.is_empty() && is_terminal(&e.state);
                        if send.send(Ok(e)).await.is_err() || ended {
                            return;
                        }
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(receive))))
    }

    async fn get_metrics(&self, _: Request<pb::GetMetricsRequest>) -> Answer<pb::Metrics> {
        let shared = self.shared.clone();
        blocking(move || {
            Ok(pb::Metrics {
                text: crate::metrics::render(&shared),
            })
        })
        .await
    }
}

/// Whether a schedule state (by name) has ended.
pub fn is_terminal(state: &str) -> bool {
    matches!(state, "completed" | "failed" | "rolled_back" | "cancelled")
}
