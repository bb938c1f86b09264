//! Webhooks for any connector: `GET` and `POST /webhooks/{name}` reach the connector of that
//! name with the whole call; a campaigns connector's status events (here the JSONL list's, with
//! its shared secret) are applied like polled ones. Connectors that take no webhooks are 404.

use crate::support::*;

const ANA: &str = "ana.garcia@example.org";

#[tokio::test(flavor = "multi_thread")]
async fn a_campaigns_webhook_withdraws_and_a_forged_one_changes_nothing() {
    let demo = Demo::new();
    let cfg = std::fs::read_to_string(demo.config()).unwrap();
    let cfg = cfg.replace(
        "status_path = \"var/campaigns-status.jsonl\"\n",
        "status_path = \"var/campaigns-status.jsonl\"\nwebhook_secret = \"list-tool-secret\"\n",
    );
    std::fs::write(demo.config(), cfg).unwrap();
    demo.run_ok(&["sync", "--once"]);
    let daemon = demo.spawn_daemon();
    let client = http();
    confirm_mailed(&demo, &client, ANA).await;
    wait_until(10, "Ana on the list", || {
        demo.list_members().contains(&ANA.to_owned())
    });
    let base = format!("http://127.0.0.1:{}", demo.port);

    // A tool validating the URL with a GET (with the secret): answered, nothing done.
    let r = client
        .get(format!("{base}/webhooks/campaigns?check=1"))
        .header("x-webhook-secret", "list-tool-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "ignored\n");
    // The mail transport takes no webhooks; other methods are refused.
    let r = client
        .post(format!("{base}/webhooks/mail"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let r = client
        .put(format!("{base}/webhooks/campaigns"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);

    let body = format!(
        r#"{{"events": [{{"list": "newsletter", "email": "{ANA}", "kind": "unsubscribed"}}]}}"#
    );
    // Forged: no secret, or the wrong one.
    for secret in [None, Some("guess")] {
        let mut req = client
            .post(format!("{base}/webhooks/campaigns"))
            .body(body.clone());
        if let Some(s) = secret {
            req = req.header("x-webhook-secret", s);
        }
        assert_eq!(req.send().await.unwrap().status(), 400);
    }
    assert_eq!(demo.state(ANA, "newsletter"), "confirmed");

    let r = client
        .post(format!("{base}/webhooks/campaigns"))
        .header("x-webhook-secret", "list-tool-secret")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        demo.state(ANA, "newsletter"),
        "withdrawn",
        "applied before the answer"
    );
    wait_until(10, "Ana off the list", || {
        !demo.list_members().contains(&ANA.to_owned())
    });
    assert_eq!(daemon.terminate(), Some(0));
}
