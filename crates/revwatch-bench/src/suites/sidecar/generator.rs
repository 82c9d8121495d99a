//! The load generator: a fixed number of keep-alive HTTP/1 connections, each with one
//! `POST /v1/authorize` in flight at a time, for a fixed duration. Every answer is
//! checked (status and decision), so that each server is credited only for the work
//! asked of it.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{
    Request, StatusCode,
    client::conn::http1::{self, SendRequest},
    header,
};
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::{net::TcpStream, task::JoinSet};

use crate::stats::Samples;

/// The route every server under test answers.
pub const PATH: &str = "/v1/authorize";
/// Longest wait for one answer before the round is declared broken.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// The request every server gets, and the decision it must answer.
#[derive(Debug, Clone)]
pub struct Exchange {
    /// The JSON body of each `POST /v1/authorize`.
    pub body: Bytes,
    /// The `decision` field every answer must carry.
    pub decision: &'static str,
}

/// One round against one server.
#[derive(Debug)]
pub struct Round {
    /// Checked answers.
    pub requests: u64,
    /// From the first request sent to the last answer received.
    pub elapsed: Duration,
    /// Request sent → answer read, per request.
    pub latency: Samples,
}

impl Round {
    /// Checked answers per second.
    pub fn per_s(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64().max(f64::MIN_POSITIVE)
    }
}

/// `connections` keep-alive connections to `addr`, each asking `exchange` one request
/// at a time for `duration`. Connections are opened before the clock starts.
pub async fn round(
    addr: SocketAddr,
    connections: usize,
    duration: Duration,
    exchange: &Exchange,
) -> anyhow::Result<Round> {
    let mut opened = Vec::with_capacity(connections);
    for _ in 0..connections {
        opened.push(Connection::open(addr).await?);
    }
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = JoinSet::new();
    for mut connection in opened {
        let exchange = exchange.clone();
        tasks.spawn(async move {
            let mut latency = Samples::with_capacity(1024);
            while Instant::now() < deadline {
                latency.push(connection.ask(&exchange).await?);
            }
            anyhow::Ok(latency)
        });
    }
    let mut latency = Samples::default();
    while let Some(done) = tasks.join_next().await {
        // An error drops the set, which aborts the other connections.
        latency.extend(done.context("load task")??);
    }
    Ok(Round {
        requests: latency.len() as u64,
        elapsed: start.elapsed(),
        latency,
    })
}

/// One keep-alive HTTP/1 connection.
pub struct Connection {
    sender: SendRequest<Full<Bytes>>,
    host: String,
    driver: tokio::task::JoinHandle<()>,
}

impl Connection {
    pub async fn open(addr: SocketAddr) -> anyhow::Result<Connection> {
        let stream = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        // Small requests and answers: no Nagle delay, as any HTTP client sets.
        stream.set_nodelay(true)?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .with_context(|| format!("HTTP/1 handshake with {addr}"))?;
        // The connection ends when the sender is dropped; its error, if any, shows up
        // on the next request.
        let driver = tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(Connection {
            sender,
            host: addr.to_string(),
            driver,
        })
    }

    /// Sends `exchange`'s request, reads and checks the answer: how long it took.
    pub async fn ask(&mut self, exchange: &Exchange) -> anyhow::Result<Duration> {
        let request = Request::post(PATH)
            .header(header::HOST, &self.host)
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(exchange.body.clone()))?;
        let sender = &mut self.sender;
        let asked = Instant::now();
        let answer = async {
            sender.ready().await?;
            let response = sender.send_request(request).await?;
            let status = response.status();
            let body = response.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, body))
        };
        let (status, body) = tokio::time::timeout(ANSWER_TIMEOUT, answer)
            .await
            .with_context(|| format!("no answer from {} within {ANSWER_TIMEOUT:?}", self.host))??;
        let took = asked.elapsed();
        check(status, &body, exchange.decision)
            .map_err(|why| anyhow::anyhow!("{}: {why}", self.host))?;
        Ok(took)
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// The fields of an answer the generator checks; servers may add others.
#[derive(Deserialize)]
struct Answer<'a> {
    #[serde(borrow)]
    decision: &'a str,
}

/// Whether an answer is a 200 carrying the `expected` decision; why not otherwise.
pub fn check(status: StatusCode, body: &[u8], expected: &str) -> Result<(), String> {
    let text = || {
        String::from_utf8_lossy(body)
            .chars()
            .take(200)
            .collect::<String>()
    };
    if status != StatusCode::OK {
        return Err(format!("status {status}, expected 200: {}", text()));
    }
    match serde_json::from_slice::<Answer>(body) {
        Ok(answer) if answer.decision == expected => Ok(()),
        Ok(answer) => Err(format!(
            "decision {:?}, expected {expected:?}",
            answer.decision
        )),
        Err(e) => Err(format!("answer without a decision ({e}): {}", text())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_wants_status_200_and_the_expected_decision() {
        let allow = br#"{"decision":"allow","policy_ids":["p"],"revision":3}"#;
        assert_eq!(check(StatusCode::OK, allow, "allow"), Ok(()));
        let wrong = check(StatusCode::OK, br#"{"decision":"deny"}"#, "allow");
        assert!(wrong.is_err_and(|e| e.contains("\"deny\"")));
        let status = check(StatusCode::SERVICE_UNAVAILABLE, allow, "allow");
        assert!(status.is_err_and(|e| e.contains("503")));
        assert!(check(StatusCode::OK, b"{}", "allow").is_err());
        assert!(check(StatusCode::OK, b"not json", "allow").is_err());
    }

    #[test]
    fn per_s_of_an_empty_round_is_finite() {
        let round = Round {
            requests: 0,
            elapsed: Duration::ZERO,
            latency: Samples::default(),
        };
        assert_eq!(round.per_s(), 0.0);
        let round = Round {
            requests: 500,
            elapsed: Duration::from_millis(250),
            latency: Samples::default(),
        };
        assert_eq!(round.per_s(), 2000.0);
    }
}
