//! The control plane and agents over QUIC: enrollment, deployment, convergence, and
//! every refusal the trust model promises.

mod fleet;

use std::time::Duration;

use fleet::{Control, RunningAgent, eventually};

const MODEL: &str = "sensor-fault";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_agents_enroll_deploy_and_converge_on_a_new_version() {
    let work = tempfile::tempdir().unwrap();
    let control = Control::start(&work.path().join("control")).await;
    control.push_sample(work.path(), MODEL, 1).await;
    control.client.deploy("edge", MODEL, 1).await.unwrap();

    let mut agents = Vec::new();
    for i in 0..3 {
        let token = control.token("edge").await;
        agents.push(
            RunningAgent::enroll(&work.path().join(format!("agent-{i}")), control.quic, &token)
                .await,
        );
    }
    for agent in &agents {
        eventually(Duration::from_secs(60), "version 1 is served", || async {
            agent.active_version(MODEL).await.as_deref() == Some("1")
        })
        .await;
        assert_eq!(agent.infer(MODEL).await.unwrap(), "1");
    }

    control.push_sample(work.path(), MODEL, 2).await;
    control.client.deploy("edge", MODEL, 2).await.unwrap();
    for agent in &agents {
        // Until version 2 is active, version 1 keeps answering: never an error.
        eventually(Duration::from_secs(60), "version 2 is active", || async {
            let answer = agent.infer(MODEL).await.expect("the model is served throughout");
            answer == "2"
        })
        .await;
    }
    let fleet = control.client.agents().await.unwrap();
    assert_eq!(fleet.len(), 3);
    assert!(
        fleet.iter().all(|a| a["group"] == "edge" && a["region"] == fleet::REGION),
        "{fleet:?}"
    );
    eventually(
        Duration::from_secs(30),
        "the fleet view shows version 2 active everywhere",
        || async {
            let fleet = control.client.agents().await.unwrap();
            let done = fleet.iter().all(|a| {
                a["status"] == "connected" && a["active"] == serde_json::json!(["sensor-fault@2"])
            });
            if !done {
                eprintln!("fleet: {fleet:?}");
            }
            done
        },
    )
    .await;
    for agent in agents {
        agent.stop().await;
    }
    control.stop().await;
}
