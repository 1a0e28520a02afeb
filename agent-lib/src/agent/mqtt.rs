//! The MQTT connection: options (TLS, client certificate, device token),
//! the event loop with batching, acks after journaling, reconnect backoff.

use super::{now_us, transport_limit, Agent, Backoff};
use anyhow::Result;
use rumqttc::{Client, Event, MqttOptions, Packet, Publish, QoS, Transport};
use std::sync::atomic::Ordering;
use std::time::Duration;

impl Agent {
    fn mqtt_options(&self) -> Result<MqttOptions> {
        let m = &self.cfg.mqtt;
        let mut o = MqttOptions::new(self.device_id.clone(), m.host.clone(), m.port);
        o.set_clean_session(false)
            .set_manual_acks(true)
            .set_keep_alive(Duration::from_secs(m.keep_alive_secs.max(5)))
            .set_max_packet_size(
                transport_limit(m.max_payload_bytes),
                transport_limit(m.max_payload_bytes),
            )
            .set_request_channel_capacity(1024);
        if m.tls {
            o.set_transport(Transport::tls_with_config(crate::tls::rumqttc_config(
                m.ca_file.as_deref(),
                self.cfg.mqtt_client_cert(),
            )?));
        }
        if m.use_device_token {
            if let Some(tok) = crate::registration::load_token(&self.cfg.token_file())? {
                o.set_credentials(self.device_id.clone(), tok.token);
            }
        }
        Ok(o)
    }

    /// Connects and runs the event loop until the request channel closes.
    pub(super) fn mqtt_loop(&self) -> Result<()> {
        let opts = self.mqtt_options()?;
        log::info!(
            "device {}: broker {}:{} (tls {}, client certificate {}), tasks on {}, task payload limit {} bytes \
             (bigger tasks get an error result), transport packet limit {} bytes",
            self.device_id,
            self.cfg.mqtt.host,
            self.cfg.mqtt.port,
            self.cfg.mqtt.tls,
            self.cfg.mqtt_client_cert().is_some(),
            self.topics.tasks,
            self.cfg.mqtt.max_payload_bytes,
            transport_limit(self.cfg.mqtt.max_payload_bytes)
        );
        let (client, mut conn) = Client::new(opts, 1024);
        *self.client.lock().unwrap_or_else(|e| e.into_inner()) = Some(client.clone());
        let mut backoff = Backoff::new(
            self.cfg.mqtt.backoff_initial_ms,
            self.cfg.mqtt.backoff_max_ms,
        );
        let mut unacked: Vec<Publish> = Vec::new();
        // Task messages whose journal write failed: kept, not acked, and
        // journaled again on every turn of the loop (at least every keep-alive)
        // until it works. The broker redelivers unacked messages only after a
        // reconnect, so dropping them here lost the tasks for as long as the
        // connection stayed up.
        let mut not_journaled: Vec<(Publish, i64)> = Vec::new();
        loop {
            // one blocking receive, then drain what is already there so a
            // burst of tasks is journaled with one fsync
            let first = match conn.recv() {
                Ok(ev) => ev,
                Err(_) => return Ok(()),
            };
            let mut events = vec![(first, now_us())];
            while matches!(
                events.last(),
                Some((Ok(Event::Incoming(Packet::Publish(_))), _))
            ) && events.len() < 256
            {
                match conn.try_recv() {
                    Ok(ev) => events.push((ev, now_us())),
                    Err(_) => break,
                }
            }
            let mut task_msgs: Vec<(Publish, i64)> = std::mem::take(&mut not_journaled);
            let mut ack_msgs: Vec<Publish> = Vec::new();
            let mut failure = None;
            for (ev, at) in events {
                match ev {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        log::info!(
                            "connected to broker (session present: {}); subscribing",
                            ack.session_present
                        );
                        backoff.reset();
                        let subs = [
                            rumqttc::SubscribeFilter::new(
                                self.topics.tasks.clone(),
                                QoS::AtLeastOnce,
                            ),
                            rumqttc::SubscribeFilter::new(
                                self.topics.acks.clone(),
                                QoS::AtLeastOnce,
                            ),
                        ];
                        if let Err(e) = client.try_subscribe_many(subs) {
                            log::error!("subscribe request: {e}");
                        }
                        self.connected.store(true, Ordering::SeqCst);
                        if let Err(e) = self.journal.outbox_reset() {
                            log::error!("outbox reset: {e:#}");
                        }
                        self.wake_outbox();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        log::info!(
                            "subscribed to {} and {}",
                            self.topics.tasks,
                            self.topics.acks
                        );
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        if p.topic == self.topics.tasks {
                            task_msgs.push((p, at));
                        } else if p.topic == self.topics.acks {
                            ack_msgs.push(p);
                        } else {
                            log::warn!("message on unexpected topic {}", p.topic);
                            unacked.push(p);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => failure = Some(e),
                }
            }
            if !task_msgs.is_empty() {
                let refs: Vec<(&[u8], i64)> = task_msgs
                    .iter()
                    .map(|(p, at)| (&p.payload[..], *at))
                    .collect();
                match self.on_task_messages(&refs) {
                    // journaled: now they may be acked
                    Ok(()) => unacked.extend(task_msgs.into_iter().map(|(p, _)| p)),
                    // not journaled: no ack; tried again on the next turn
                    Err(e) => {
                        log::error!(
                            "journaling {} incoming task message(s) failed, not acked; trying again: {e:#}",
                            task_msgs.len()
                        );
                        not_journaled = task_msgs;
                    }
                }
            }
            if !ack_msgs.is_empty() {
                let refs: Vec<&[u8]> = ack_msgs.iter().map(|p| &p.payload[..]).collect();
                self.on_ack_messages(&refs);
                unacked.extend(ack_msgs);
            }
            unacked.retain(|p| client.try_ack(p).is_err());
            if let Some(e) = failure {
                self.connected.store(false, Ordering::SeqCst);
                let d = backoff.next_delay();
                log::warn!("mqtt connection: {e}; reconnecting in {} ms", d.as_millis());
                if let Some(h) =
                    crate::clock::hint(&format!("{e} {e:?}"), crate::clock::last(&self.cfg))
                {
                    log::error!("mqtt TLS: {h}; retrying with backoff");
                }
                std::thread::sleep(d);
                let refused = matches!(
                    e,
                    rumqttc::ConnectionError::ConnectionRefused(
                        rumqttc::ConnectReturnCode::BadUserNamePassword
                            | rumqttc::ConnectReturnCode::NotAuthorized
                    )
                );
                if refused && self.cfg.mqtt.use_device_token && self.cfg.backend.url.is_some() {
                    // refresh, and register again if the backend answers 401
                    match crate::registration::refresh(&self.cfg) {
                        Ok(_) => log::info!("device token renewed after the broker refused it"),
                        Err(e) => log::error!("renewing the device token: {e:#}"),
                    }
                }
                if self.cfg.mqtt.use_device_token {
                    if let Ok(Some(tok)) = crate::registration::load_token(&self.cfg.token_file()) {
                        conn.eventloop
                            .mqtt_options
                            .set_credentials(self.device_id.clone(), tok.token);
                    }
                }
            }
        }
    }
}
