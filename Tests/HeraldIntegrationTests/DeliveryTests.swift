import Foundation
import HTTPTypes
import HeraldCore
import Hummingbird
import HummingbirdTesting
import NIOCore
import PostgresNIO
import Testing

@testable import HeraldAPI
@testable import HeraldDelivery
@testable import HeraldStore

/// Delivery over real protocols: the SMTP server and HTTP receiver `make test` starts, the
/// worker pool, and the signed links in the messages.
@Suite("Delivery")
struct DeliveryTests {
    @Test(
        "email: both parts, sender identity, Message-ID, both unsubscribe headers, rendered content and no payload field the template did not ask for"
    )
    func email() async throws {
        try await withCatalogue { org, catalogue, client in
            try await org.store { tx in
                try await tx.putTemplate(
                    typeID: catalogue.isqCritical, channel: .email, locale: "en",
                    content: TemplateContent(
                        subject: "Critical ISQ {{payload.isq}} for implant {{payload.implant}}",
                        body:
                            "Stability {{payload.isq}} is below {{payload.threshold}}.\nImplant {{payload.implant}}\nOpen: {{{links.open}}}\nUnsubscribe: {{{links.unsubscribe}}}",
                        html:
                            "<p>Stability <b>{{payload.isq}}</b> is below {{payload.threshold}}.</p><p>Implant {{payload.implant}}</p><a href=\"{{{links.open}}}\">Open</a>"
                    ))
                try await tx.setEmailIdentity(from: "alerts@clinic.example", fromName: "Clinic Alerts", replyTo: "desk@clinic.example")
            }
            try await org.notify(
                EventRequest(
                    typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]),
                    payload: .object([
                        "isq": .number(25), "implant": .string("A-12 & O'Neil <x>"), "threshold": .number(60),
                        "patient_secret": .string("SECRET-7731"),
                    ]),
                    url: "https://ward.example.org/patients/7"))
            let deliveries = try await TestWorkers.run(org.id) { try await org.settled() }
            let delivery = try #require(deliveries.first { $0.channel == .email })
            #expect(delivery.status == .sent)
            #expect(delivery.lastResponseCode == 250)
            #expect(delivery.lastResponse?.hasPrefix("250") == true)

            let mails = try await Peers.mail(to: "member@\(org.slug).example")
            try #require(mails.count == 1)
            let raw = try #require(mails[0]["data"] as? String)
            let mail = try ParsedMail(raw)
            // The Subject and the text part are text: the payload's value as written; the HTML part escapes it.
            #expect(mail.headers["Subject"] == "Critical ISQ 25 for implant A-12 & O'Neil <x>")
            #expect(mail.headers["From"] == "Clinic Alerts <alerts@clinic.example>")
            #expect(mail.headers["Reply-To"] == "desk@clinic.example")
            #expect(mail.headers["Message-ID"] == "<\(delivery.id.lowercased)@clinic.example>")
            #expect(mail.headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click")
            let unsubscribe = try #require(mail.headers["List-Unsubscribe"])
            #expect(unsubscribe.hasPrefix("<http://herald.test/v1/unsubscribe/") && unsubscribe.hasSuffix(">"))
            let text = try #require(mail.parts["text/plain"])
            let html = try #require(mail.parts["text/html"])
            #expect(text.contains("Stability 25 is below 60."))
            #expect(text.contains("Implant A-12 & O'Neil <x>"), "\(text)")
            #expect(html.contains("Implant A-12 &amp; O&#39;Neil &lt;x&gt;"), "\(html)")
            #expect(html.contains("<b>25</b>"))
            #expect(!raw.contains("SECRET-7731") && !text.contains("SECRET-7731") && !html.contains("SECRET-7731"))

            // The links in the message: the tracked link redirects to the event's URL only, and
            // one-click unsubscribe works without a login.
            let open = try #require(text.firstMatch(of: /http:\/\/herald\.test(\/v1\/links\/[A-Za-z0-9._-]+)/)).1
            let unsubscribePath = String(unsubscribe.dropFirst("<http://herald.test".count).dropLast())
            // A link scanner's HEAD sees the redirect and counts no click.
            let scanned = try await client.send(.head, String(open))
            #expect(scanned.status == .found && scanned.headers[.location] == "https://ward.example.org/patients/7")
            #expect(try await org.store { tx in try await tx.clickCount(deliveryID: delivery.id) } == 0)
            let click = try await client.send(.get, String(open))
            #expect(click.status == .found)
            #expect(click.headers[.location] == "https://ward.example.org/patients/7")
            #expect(try await org.store { tx in try await tx.clickCount(deliveryID: delivery.id) } == 1)

            let page = try await client.send(.get, unsubscribePath)
            #expect(page.status == .ok && page.text.contains("Unsubscribe"))
            // The page's button is never shown inside another site's frame.
            #expect(page.headers[.xFrameOptions] == "DENY" && page.headers[.contentSecurityPolicy] == "frame-ancestors 'none'")
            let untouched = try await org.store { tx in try await tx.preferences(ofUser: org.memberID) }
            #expect(untouched.isEmpty, "GET changes nothing")

            let tampered = try await client.send(.get, String(unsubscribePath.dropLast()) + (unsubscribePath.hasSuffix("A") ? "B" : "A"))
            #expect(tampered.isProblem(.notFound))
            #expect(tampered.text.contains("This link is not valid") && !tampered.text.contains("organisation"), "\(tampered.text)")
            let wrongScope = try await client.execute(
                uri: String(open).replacingOccurrences(of: "/v1/links/", with: "/v1/unsubscribe/"), method: .post,
                headers: [.contentType: "application/x-www-form-urlencoded"], body: ByteBuffer(string: "List-Unsubscribe=One-Click"))
            #expect(wrongScope.isProblem(.notFound), "a click token cannot unsubscribe")

            // RFC 8058 asks mail receivers for multipart/form-data (a URL-encoded form works too:
            // CitusReadinessTests). A wrong value, a JSON body, a broken multipart: 400, nothing changed.
            func form(_ value: String, boundary: String = "xYz") -> ByteBuffer {
                ByteBuffer(
                    string:
                        "--\(boundary)\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n\(value)\r\n--\(boundary)--\r\n")
            }
            let multipart: HTTPFields = [.contentType: "multipart/form-data; boundary=xYz"]
            let refused = [
                try await client.execute(uri: unsubscribePath, method: .post, headers: multipart, body: form("Nope")),
                try await client.execute(
                    uri: unsubscribePath, method: .post, headers: multipart, body: form("One-Click", boundary: "other")),
                try await client.execute(
                    uri: unsubscribePath, method: .post, headers: [.contentType: "application/json"],
                    body: ByteBuffer(string: #"{"List-Unsubscribe": "One-Click"}"#)),
            ]
            for response in refused.prefix(2) { #expect(response.isProblem(.badRequest), "\(response.text.prefix(200))") }
            // JSON is not a form: 415, saying which forms it takes.
            #expect(refused[2].isProblem(.unsupportedMediaType), "\(refused[2].text.prefix(200))")
            #expect(refused[2].text.contains("multipart/form-data"), "\(refused[2].text.prefix(200))")
            #expect(try await org.store { tx in try await tx.preferences(ofUser: org.memberID) }.isEmpty)
            let oneClick = try await client.execute(uri: unsubscribePath, method: .post, headers: multipart, body: form("One-Click"))
            #expect(oneClick.status == .ok, "\(oneClick.text.prefix(200))")
            #expect(oneClick.headers[.location] == nil)
            let cells = try await org.store { tx in try await tx.preferences(ofUser: org.memberID) }
            #expect(
                cells == [
                    PreferenceCell(
                        categoryID: catalogue.alerts, channel: .email, setting: PreferenceSetting(enabled: false, frequency: .none))
                ])
            let audited = try await org.store { tx in
                try await tx.connection.query(
                    "SELECT count(*)::int FROM audit_log WHERE action = 'preference.unsubscribe'", logger: tx.logger
                )
                .collect()[0].decode(Int.self)
            }
            #expect(audited == 1)
            let (_, next) = try await org.notify(
                EventRequest(typeKey: "ISQ_CRITICAL", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
            #expect(next.traces[0].channels.first { $0.decision.channel == .email }?.decision.reason == .channelDisabled)
        }
    }

    @Test(
        "webhook: a receiver that fails twice gets three attempts on schedule, each signed (verified by the standardwebhooks package) with one webhook-id"
    )
    func webhookRetries() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType(
            "WARD_ALERT", category: catalogue.activity, channels: [.webhook],
            templates: [.webhook: TemplateContent(subject: "Ward {{payload.ward}}", body: "Bed {{payload.bed}}")])
        let hook = Peers.hook()
        try await Peers.configure(hook.name, ["fail_times": 2, "fail_status": 503])
        let secret = WebhookSecret.generate().string
        let endpoint = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "ward", url: hook.url, eventTypes: ["WARD_ALERT"], secret: secret)
        }
        try await org.notify(
            EventRequest(
                typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]),
                payload: .object(["ward": .string("3B"), "bed": .number(12), "hidden": .string("NOPE-99")])))
        let delivery = try #require(try await TestWorkers.run(org.id) { try await org.settled() }.first)
        #expect(delivery.status == .sent && delivery.attempts == 3 && delivery.endpointID == endpoint.id)
        let log = try await org.store { tx in try await tx.deliveryAttempts(delivery.id) }
        #expect(log.map(\.outcome) == [.failed, .failed, .sent])
        #expect(log.map(\.responseCode) == [503, 503, 200])

        let received = try await Peers.requests(hook.name)
        try #require(received.count == 3)
        let ids = Set(received.compactMap { ($0["headers"] as? [String: String])?["webhook-id"] })
        #expect(ids == ["msg_\(delivery.id.lowercased)"])
        let times = received.compactMap { $0["time"] as? Double }
        // The schedule: 0.3 s, then 0.6 s (base 0.3, factor 2, no jitter).
        #expect(times[1] - times[0] >= 0.25 && times[2] - times[1] >= 0.55)
        let verification = try await Peers.verify(hook.name, secret: secret)
        #expect(verification.verified == 3 && verification.failed.isEmpty)
        let body = try #require(received.last?["body"] as? String)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: Any])
        let data = try #require(json["data"] as? [String: Any])
        #expect(json["type"] as? String == "notification.created")
        #expect(data["title"] as? String == "Ward 3B" && data["body"] as? String == "Bed 12")
        #expect(!body.contains("NOPE-99"))
    }

    @Test("an email whose recipient switched email off after the event is not sent (CANCELLED, with why); on again, a retry sends it")
    func emailSwitchedOffBeforeSending() async throws {
        try await withCatalogue { org, catalogue, client in
            try await org.deliveryType("REMINDER", category: catalogue.activity, channels: [.email])
            let request = EventRequest(
                typeKey: "REMINDER", audience: Audience(userIDs: [org.memberID, org.ownerID]), payload: .object([:]))
            try await org.notify(request)
            // After notify, before the workers: the member switches email off for the category.
            let off = try await client.send(
                .put, "/v1/me/preferences", token: org.memberToken,
                json: #"{"items": [{"category": "activity", "channel": "email", "enabled": false, "frequency": "NONE"}]}"#)
            #expect(off.status == .ok, "\(off.text)")
            var deliveries = try await TestWorkers.run(org.id) { try await org.settled() }
            let member = try #require(deliveries.first { $0.userID == org.memberID })
            #expect(member.status == .cancelled)
            #expect(member.lastError?.contains("switched email off for Activity") == true, "\(member.lastError ?? "")")
            #expect(deliveries.first { $0.userID == org.ownerID }?.status == .sent)
            #expect(try await Peers.mail(to: "member@\(org.slug).example").isEmpty)
            // The organisation's default off stops the owner's, who set nothing of their own.
            try await org.notify(EventRequest(typeKey: "REMINDER", audience: Audience(userIDs: [org.ownerID]), payload: .object([:])))
            let defaults = try await client.send(
                .put, "/v1/organisation/preference-defaults", token: org.ownerToken,
                json: #"{"items": [{"category": "activity", "channel": "email", "enabled": false, "frequency": "NONE"}]}"#)
            #expect(defaults.status == .ok, "\(defaults.text)")
            deliveries = try await TestWorkers.run(org.id) { try await org.settled() }
            #expect(
                deliveries.filter { $0.userID == org.ownerID }.map(\.status).sorted { $0.rawValue < $1.rawValue } == [.cancelled, .sent])
            // On again: a retry of the member's sends it.
            _ = try await client.send(.put, "/v1/me/preferences", token: org.memberToken, json: #"{"items": []}"#)
            _ = try await client.send(.put, "/v1/organisation/preference-defaults", token: org.ownerToken, json: #"{"items": []}"#)
            let retried = try await client.send(.post, "/v1/deliveries/\(member.id.lowercased)/retry", token: org.ownerToken)
            #expect(retried.status == .ok || retried.status == .accepted, "\(retried.text)")
            deliveries = try await TestWorkers.run(org.id) { try await org.settled() }
            #expect(deliveries.first { $0.id == member.id }?.status == .sent)
            #expect(try await Peers.mail(to: "member@\(org.slug).example").count == 1)
        }
    }

    @Test("webhook: Retry-After is honoured")
    func retryAfter() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        let hook = Peers.hook()
        try await Peers.configure(hook.name, ["fail_times": 1, "fail_status": 429, "retry_after": "2"])
        _ = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        try await org.notify(EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
        var settings = TestWorkers.Settings()
        settings.retry = RetryPolicy(baseDelay: 0.1, factor: 1, maximumDelay: 60, jitter: 0)
        let delivery = try #require(try await TestWorkers.run(org.id, settings) { try await org.settled() }.first)
        #expect(delivery.status == .sent && delivery.attempts == 2)
        let times = try await Peers.requests(hook.name).compactMap { $0["time"] as? Double }
        try #require(times.count == 2)
        #expect(times[1] - times[0] >= 1.95, "the retry waited for Retry-After (2 s), not the 0.1 s schedule")
    }

    @Test("webhook: a receiver that always fails ends DEAD with every attempt logged")
    func alwaysFailing() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        let hook = Peers.hook()
        try await Peers.configure(hook.name, ["status": 500])
        _ = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        try await org.notify(EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
        var settings = TestWorkers.Settings()
        settings.retry = RetryPolicy(baseDelay: 0.05, factor: 1, maximumDelay: 1, jitter: 0)
        let delivery = try #require(try await TestWorkers.run(org.id, settings) { try await org.settled() }.first)
        #expect(delivery.status == .dead && delivery.attempts == delivery.maxAttempts)
        let log = try await org.store { tx in try await tx.deliveryAttempts(delivery.id) }
        #expect(log.map(\.attempt) == Array(1...delivery.maxAttempts))
        #expect(log.map(\.outcome) == Array(repeating: AttemptOutcome.failed, count: delivery.maxAttempts - 1) + [.dead])
        #expect(log.allSatisfy { $0.responseCode == 500 && $0.error?.contains("500") == true })
        #expect(try await Peers.requests(hook.name).count == delivery.maxAttempts)
    }

    @Test("webhook: 410 Gone ends the delivery and disables the endpoint; later events find no destination")
    func gone() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        let hook = Peers.hook()
        try await Peers.configure(hook.name, ["status": 410])
        let endpoint = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        try await org.notify(EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
        let delivery = try #require(try await TestWorkers.run(org.id) { try await org.settled() }.first)
        #expect(delivery.status == .dead && delivery.attempts == 1 && delivery.lastResponseCode == 410)
        let after = try await org.store { tx in try await tx.endpoint(endpoint.id) }
        #expect(!after.enabled && after.disabledReason?.contains("410") == true)
        // The system's change is in the audit log, once.
        let audited = try await org.store { tx in
            try await tx.auditEntries(action: "endpoint.disable", targetID: endpoint.id.lowercased, limit: 10, after: nil).items
        }
        #expect(audited.count == 1 && audited.first?.actorType == .system, "\(audited)")
        #expect(audited.first?.after?.value(at: "disabled_reason") == .string(after.disabledReason ?? ""))
        let (_, plan) = try await org.notify(
            EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
        #expect(plan.traces[0].channels.first { $0.decision.channel == .webhook }?.decision.reason == .noDestination)
    }

    @Test(
        "a delivery claimed before its event was cancelled ends CANCELLED, unsent; one whose recipient was deactivated after the claim ends DEAD with the reason"
    )
    func stoppedAfterTheClaim() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        let hook = Peers.hook()
        _ = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        let env = try await TestEnvironment.shared
        let worker = try await DirectWorker(org.id)
        defer { Task { try? await worker.http.shutdown() } }
        /// Notifies, claims the delivery as a worker would, lets `between` change the world, then
        /// runs the attempt and records it: the delivery as it ended and its attempt log.
        func attempt(between: (_ event: UUID) async throws -> Void) async throws -> (Delivery, [DeliveryAttempt]) {
            let (event, _) = try await org.notify(
                EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
            let claims = try await worker.claim()
            try #require(claims.count == 1)
            let claim = claims[0]
            try await between(event.id)
            guard case .done(let record) = try await worker.handler.handle(claim, logger: env.logger) else {
                Issue.record("the attempt was given back")
                throw CancellationError()
            }
            #expect(try await worker.complete(claim, record))
            let delivery = try await org.store { tx in try await tx.delivery(claim.deliveryID) }
            #expect(delivery.eventID == event.id)
            return (delivery, try await org.store { tx in try await tx.deliveryAttempts(claim.deliveryID) })
        }

        let (cancelled, cancelledLog) = try await attempt { event in
            let cancellation = try await org.store { tx in try await tx.cancelEvent(event, now: Date()) }
            #expect(cancellation?.deliveries == 0, "the claimed row is the worker's")
        }
        #expect(cancelled.status == .cancelled && cancelled.lastError == "Not sent: the event was cancelled.", "\(cancelled)")
        #expect(cancelledLog.map(\.outcome) == [.cancelled] && cancelledLog.first?.error == "Not sent: the event was cancelled.")

        let (dead, deadLog) = try await attempt { _ in
            _ = try await org.store { tx in try await tx.setUserActive(org.memberID, false) }
        }
        #expect(dead.status == .dead && dead.lastError == "Not sent: the recipient was deactivated.", "\(dead)")
        #expect(deadLog.map(\.outcome) == [.dead])
        // Neither reached the receiver.
        #expect(try await Peers.requests(hook.name).isEmpty)
    }

    @Test("the worker's claim takes a critical event's email and webhook before the backlog of normal ones waiting before them")
    func urgentFirst() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook, .email])
        let hook = Peers.hook()
        _ = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        let worker = try await DirectWorker(org.id)
        defer { Task { try? await worker.http.shutdown() } }
        // A backlog of 12 normal events (12 webhooks, 12 emails), then a critical one.
        let request = { (priority: Priority?) in
            EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:]), priority: priority)
        }
        for _ in 0..<12 { _ = try await org.notify(request(nil)) }
        let (_, critical) = try await org.notify(request(.critical))
        #expect(critical.deliveries.count == 2)
        // The pool's claim (10 at most, 4 per endpoint): the critical webhook within the endpoint's
        // 4, the critical email among the rest.
        let claimed = Set(try await worker.claim().map(\.deliveryID))
        #expect(claimed.count == 10)
        #expect(Set(critical.deliveries.map(\.id)).isSubset(of: claimed), "\(claimed)")
    }

    @Test(
        "a cancel during a send: a failed send ends CANCELLED, not retried; a row that will not be sent takes no circuit trial; a row sent after its endpoint moved names the URL it went to"
    )
    func cancelAndMoveDuringASend() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        let before = Peers.hook(), after = Peers.hook()
        let endpoint = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: before.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        let env = try await TestEnvironment.shared
        let worker = try await DirectWorker(org.id)
        defer { Task { try? await worker.http.shutdown() } }
        let request = EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:]))
        func claimOne() async throws -> ClaimedDelivery {
            let claims = try await worker.claim()
            try #require(claims.count == 1)
            return claims[0]
        }

        // A send under way when its event is cancelled, which the receiver did not answer.
        let (first, _) = try await org.notify(request)
        let inFlight = try await claimOne()
        _ = try await org.store { tx in try await tx.cancelEvent(first.id, now: Date()) }
        var timedOut = DeliveryAttemptRecord(
            channel: .webhook,
            result: .failed(responseCode: nil, error: "The receiver did not answer in time.", retryAt: Date().addingTimeInterval(30)))
        timedOut.endpointAnswered = (endpoint.id, false)
        #expect(try await worker.complete(inFlight, timedOut))
        let ended = try await org.store { tx in try await tx.delivery(inFlight.deliveryID) }
        #expect(ended.status == .cancelled, "a failed send of a cancelled event is not retried: \(ended.status)")
        #expect(try await org.store { tx in try await tx.deliveryAttempts(inFlight.deliveryID) }.map(\.outcome) == [.failed])
        worker.slots.leave(inFlight)

        // A half-open circuit: a row of a cancelled event does not take the trial.
        let (second, _) = try await org.notify(request)
        let retryAt = try await org.store { tx in
            try await tx.query(
                "UPDATE endpoints SET circuit_opened_at = now() - interval '2 minutes', circuit_retry_at = now() - interval '1 second' WHERE id = \(endpoint.id) RETURNING circuit_retry_at"
            )[0].decode(Date.self)
        }
        let stopped = try await claimOne()
        _ = try await org.store { tx in try await tx.cancelEvent(second.id, now: Date()) }
        guard case .done(let record) = try await worker.handler.handle(stopped, logger: env.logger) else {
            Issue.record("the row was given back")
            return
        }
        #expect(record.result == .cancelled(error: "Not sent: the event was cancelled."))
        #expect(try await org.store { tx in try await tx.endpoint(endpoint.id) }.circuit.retryAt == retryAt, "no trial was taken")
        _ = try await worker.complete(stopped, record)

        // Moved while its row was claimed: sent to the new URL, and the row says so. The move
        // closed the circuit too.
        _ = try await org.notify(request)
        let moving = try await claimOne()
        let moved = try await org.store { tx in
            try await tx.updateEndpoint(endpoint.id, EndpointFields(url: after.url))
        }
        #expect(moved.circuit.openedAt == nil && moved.circuit.failures == 0)
        guard case .done(let sent) = try await worker.handler.handle(moving, logger: env.logger) else {
            Issue.record("the row was given back")
            return
        }
        #expect(try await worker.complete(moving, sent))
        let delivered = try await org.store { tx in try await tx.delivery(moving.deliveryID) }
        #expect(delivered.status == .sent && delivered.destination == after.url, "\(delivered.status) \(delivered.destination)")
        #expect(try await Peers.requests(after.name).count == 1)
        #expect(try await Peers.requests(before.name).isEmpty)
    }

    @Test("webhook: an endpoint's new URL is where its waiting rows go and what they say; a sent row keeps the URL it went to")
    func endpointMoved() async throws {
        try await withCatalogue(configure: { $0.destinationsAllowed = ["127.0.0.1/32"] }) { org, catalogue, client in
            try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
            let before = Peers.hook(), after = Peers.hook()
            let endpoint = try await org.store { tx in
                try await tx.createEndpoint(
                    channel: .webhook, format: .standard, name: "w", url: before.url, eventTypes: [],
                    secret: WebhookSecret.generate().string)
            }
            let request = EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:]))
            let (sent, _) = try await org.notify(request)
            _ = try await TestWorkers.run(org.id) { try await org.settled() }
            let (waiting, _) = try await org.notify(request)
            let moved = try await client.send(
                .patch, "/v1/endpoints/\(endpoint.id.lowercased)", token: org.ownerToken, json: "{\"url\": \"\(after.url)\"}")
            #expect(moved.status == .ok, "\(moved.text)")
            let destinations = { (event: UUID) in
                try await org.deliveries().filter { $0.eventID == event }.map(\.destination)
            }
            #expect(try await destinations(sent.id) == [before.url])
            #expect(try await destinations(waiting.id) == [after.url])
            _ = try await TestWorkers.run(org.id) { try await org.settled() }
            #expect(try await Peers.requests(before.name).count == 1)
            #expect(try await Peers.requests(after.name).count == 1)
        }
    }

    @Test("webhook: during a secret rotation both secrets sign, and each verifies independently")
    func rotation() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        let hook = Peers.hook()
        let old = WebhookSecret.generate().string, new = WebhookSecret.generate().string
        try await org.store { tx in
            let endpoint = try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: old)
            _ = try await tx.rotateEndpointSecret(endpoint.id, newSecret: new, overlapUntil: Date().addingTimeInterval(3600), now: Date())
        }
        try await org.notify(EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
        _ = try await TestWorkers.run(org.id) { try await org.settled() }
        let received = try await Peers.requests(hook.name)
        try #require(received.count == 1)
        let signature = try #require((received[0]["headers"] as? [String: String])?["webhook-signature"])
        #expect(signature.split(separator: " ").filter { $0.hasPrefix("v1,") }.count == 2)
        #expect(try await Peers.verify(hook.name, secret: old).verified == 1)
        #expect(try await Peers.verify(hook.name, secret: new).verified == 1)
    }

    @Test("webhook: a rotation during another's overlap keeps every secret within its promised overlap; no overlap ends them all")
    func rotationDuringOverlap() async throws {
        let org = try await TestOrganisation.make()
        let secrets = (0..<4).map { _ in WebhookSecret.generate().string }
        let now = Date(timeIntervalSince1970: Date().timeIntervalSince1970.rounded()) // whole seconds: stored and read back exactly
        try await org.store { tx in
            let endpoint = try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: "https://93.184.216.34/hook", eventTypes: [], secret: secrets[0])
            // Twice within the first overlap (a client retrying a rotation that timed out):
            // the first secret keeps its 24 hours, the second its own.
            _ = try await tx.rotateEndpointSecret(endpoint.id, newSecret: secrets[1], overlapUntil: now + 86_400, now: now)
            let twice = try await tx.rotateEndpointSecret(endpoint.id, newSecret: secrets[2], overlapUntil: now + 3_600, now: now + 1)
            #expect(twice.signingSecrets(at: now + 2) == [secrets[2], secrets[1], secrets[0]])
            #expect(twice.signingSecrets(at: now + 7_200) == [secrets[2], secrets[0]])
            #expect(twice.signingSecrets(at: now + 86_401) == [secrets[2]])
            #expect(twice.overlapEnds(at: now + 2) == now + 86_400)
            #expect(twice.overlapEnds(at: now + 86_401) == nil)
            // No overlap: only the new secret signs, at once.
            let cut = try await tx.rotateEndpointSecret(endpoint.id, newSecret: secrets[3], overlapUntil: now + 2, now: now + 2)
            #expect(cut.signingSecrets(at: now + 2) == [secrets[3]])
            #expect(cut.overlapEnds(at: now + 2) == nil)
        }
    }

    @Test("chat: a Slack incoming webhook gets the type's chat template as text")
    func chat() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType(
            "WARD_ALERT", category: catalogue.activity, channels: [.chat],
            templates: [.chat: TemplateContent(subject: "Ward {{payload.ward}}", body: "Bed {{payload.bed}} needs a nurse")])
        let hook = Peers.hook("slack")
        _ = try await org.store { tx in
            try await tx.createEndpoint(channel: .chat, format: .slack, name: "#ward", url: hook.url, eventTypes: [], secret: nil)
        }
        try await org.notify(
            EventRequest(
                typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]),
                payload: .object(["ward": .string("3B <East> & \"O'Neil\""), "bed": .number(12)])))
        let delivery = try #require(try await TestWorkers.run(org.id) { try await org.settled() }.first)
        #expect(delivery.status == .sent && delivery.channel == .chat)
        let body = try #require(try await Peers.requests(hook.name).first?["body"] as? String)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: String])
        // Slack's own escapes only (&amp; &lt; &gt;), which Slack shows as the characters.
        #expect(json == ["text": "*Ward 3B &lt;East&gt; &amp; \"O'Neil\"*\nBed 12 needs a nurse"], "\(json)")
    }

    @Test("chat: a Mattermost message shows values' Markdown as written (no link, image or mention), the template's own Markdown kept")
    func mattermostValuesEscaped() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType(
            "WARD_NOTE", category: catalogue.activity, channels: [.chat],
            templates: [
                .chat: TemplateContent(
                    subject: "Note from {{payload.author}}", body: "_{{payload.note}}_ {{#payload.urgent}}**urgent**{{/payload.urgent}}")
            ])
        let hook = Peers.hook("mattermost")
        _ = try await org.store { tx in
            try await tx.createEndpoint(channel: .chat, format: .mattermost, name: "ward", url: hook.url, eventTypes: [], secret: nil)
        }
        try await org.notify(
            EventRequest(
                typeKey: "WARD_NOTE", audience: Audience(userIDs: [org.memberID]),
                payload: .object([
                    "author": .string("*Dr* O'Neil @channel"),
                    "note": .string(
                        "[Reset your password](https://evil.example) ![x](https://evil.example/p.png) # 2 `rm` a_b <b> https://h.example/a_b"
                    ),
                    "urgent": .bool(true),
                ])))
        let delivery = try #require(try await TestWorkers.run(org.id) { try await org.settled() }.first)
        #expect(delivery.status == .sent && delivery.channel == .chat)
        let body = try #require(try await Peers.requests(hook.name).first?["body"] as? String)
        let json = try #require(try JSONSerialization.jsonObject(with: Data(body.utf8)) as? [String: String])
        let expected =
            "**Note from \\*Dr\\* O&#39;Neil @\u{2060}channel**\n"
            + "_\\[Reset your password\\](https://evil.example) !\\[x\\](https://evil.example/p.png) \\# 2 \\`rm\\` a\\_b &lt;b&gt; "
            + "https://h.example/a_b_ **urgent**"
        #expect(json == ["text": expected], "\(json)")
    }

    @Test("SSRF: private, loopback, link-local, metadata and disguised addresses are refused at creation and again at connect time")
    func ssrf() async throws {
        try await withOrganisation { org, client in
            let refused = [
                "http://169.254.169.254/latest/meta-data", "http://10.0.0.5/hook", "http://172.16.3.4/hook", "http://192.168.1.1/hook",
                "http://[::1]/hook", "http://[fd00:ec2::254]/hook", "http://[fe80::1]/hook", "http://[::ffff:127.0.0.1]/hook",
                "http://2130706433/hook", "http://0x7f000001/hook", "http://0177.0.0.1/hook", "http://127.1/hook", "http://localhost/hook",
                "http://0.0.0.0/hook", "http://127.0.0.1:24326/hooks/x",
                // IPv4-translated (RFC 2765) and local-use NAT64 (RFC 8215) forms (issue 8 item 8).
                "http://[::ffff:0:169.254.169.254]/", "http://[64:ff9b:1::a00:1]/",
            ]
            // The API server here allows no private range at all (the default).
            for url in refused {
                let response = try await client.send(
                    .post, "/v1/endpoints", token: org.ownerToken,
                    json: #"{"channel": "webhook", "name": "x", "url": "\#(url)"}"#)
                #expect(response.isProblem(.unprocessableContent), "\(url) was not refused: \(response.status)")
                #expect((response.json["detail"] as? String)?.contains("Herald does not send") == true, "\(url): \(response.text)")
            }
            let created = try await client.send(
                .post, "/v1/endpoints", token: org.ownerToken,
                json: #"{"channel": "webhook", "name": "public", "url": "https://93.184.216.34/hook"}"#)
            #expect(created.status == .created)
            #expect((created.json["secret"] as? String)?.hasPrefix("whsec_") == true)
            let id = try #require(created.json["id"] as? String)
            let read = try await client.send(.get, "/v1/endpoints/\(id)", token: org.ownerToken)
            #expect(read.status == .ok && read.json["secret"] == nil, "the secret is shown once")
            #expect(try await org.store { tx in try await tx.endpoints(limit: 100, after: nil).items.count } == 1)

            // Connect time: an endpoint that reached the table (here directly) is checked again
            // before every connection, by workers that allow no private range.
            let catalogue = try await TestCatalogue.make(in: org)
            try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
            let hook = Peers.hook()
            try await org.store { tx in
                for endpoint in try await tx.endpoints(limit: 100, after: nil).items { try await tx.deleteEndpoint(endpoint.id) }
                _ = try await tx.createEndpoint(
                    channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
            }
            try await org.notify(EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
            var settings = TestWorkers.Settings()
            settings.allowed = []
            let delivery = try #require(try await TestWorkers.run(org.id, settings) { try await org.settled() }.first)
            #expect(delivery.status == .dead && delivery.attempts == 1)
            #expect(delivery.lastError?.contains("loopback") == true)
            #expect(try await Peers.requests(hook.name).isEmpty)
        }
    }

    @Test("a committed notify wakes the workers through NOTIFY, long before their next poll")
    func notifyWakes() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        let hook = Peers.hook()
        _ = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        var settings = TestWorkers.Settings()
        settings.pollInterval = .seconds(600)
        let waited = try await TestWorkers.run(org.id, settings) {
            try await Task.sleep(for: .seconds(1)) // the pool's first look finds nothing and it waits
            let clock = ContinuousClock()
            let start = clock.now
            try await org.notify(EventRequest(typeKey: "WARD_ALERT", audience: Audience(userIDs: [org.memberID]), payload: .object([:])))
            let sent = try await eventually(timeout: .seconds(60), every: .milliseconds(20)) {
                try await org.deliveries().first?.status == .sent
            }
            #expect(sent)
            return clock.now - start
        }
        // With a 10-minute poll, only the notification can have woken the pool. (Alone it takes
        // well under a second; beside the whole suite on two cores, 5 to 11 s have been seen.)
        #expect(waited < .seconds(60))
        print("notify → SENT through NOTIFY in \(waited)")
    }

    @Test("several pools with many workers: one claim per row per attempt, every row sent once")
    func manyWorkers() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType("WARD_ALERT", category: catalogue.activity, channels: [.webhook])
        try await org.addUsers(300)
        let hook = Peers.hook()
        _ = try await org.store { tx in
            try await tx.createEndpoint(
                channel: .webhook, format: .standard, name: "w", url: hook.url, eventTypes: [], secret: WebhookSecret.generate().string)
        }
        try await org.notify(EventRequest(typeKey: "WARD_ALERT", audience: Audience(everyone: true), payload: .object([:])))
        var settings = TestWorkers.Settings()
        settings.pools = 3
        settings.concurrency = 8
        let deliveries = try await TestWorkers.run(org.id, settings) { try await org.settled() }
        #expect(deliveries.count == 302)
        #expect(deliveries.allSatisfy { $0.status == .sent && $0.attempts == 1 })
        let attempts = try await org.store { tx in
            try await tx.connection.query(
                "SELECT count(*)::int, count(DISTINCT (delivery_id, attempt))::int, count(DISTINCT worker)::int FROM delivery_attempts",
                logger: tx.logger
            ).collect()[0].decode((Int, Int, Int).self)
        }
        #expect(attempts.0 == 302 && attempts.1 == 302)
        #expect(attempts.2 > 1, "the pools shared the work")
        let ids = try await Peers.ids(hook.name)
        #expect(ids["total"] as? Int == 302 && ids["unique"] as? Int == 302)
    }

    @Test(
        "addresses Herald can never send to are refused with a 422 naming the field; internationalised ones are accepted (issue 8 item 9)")
    func undeliverableAddressesAreRefused() async throws {
        try await withOrganisation { org, client in
            let bad = [
                ("dr.x@clinic..example", "the domain contains two dots in a row"),
                ("dr..x@clinic.example", "the part before the @ contains two dots in a row"),
                (".dr@clinic.example", "the part before the @ starts or ends with a dot"),
                ("dr x@clinic.example", "the part before the @ contains a space"),
                ("dr@localhost", "the domain has no dot"),
                ("dr@[192.0.2.1]", "address literals"),
                ("dr@clinic_1.example", "not allowed in a host name"),
                (String(repeating: "d", count: 65) + "@clinic.example", "longer than 64 bytes"),
            ]
            for (address, reason) in bad {
                let created = try await client.send(
                    .post, "/v1/users", token: org.ownerToken,
                    json: #"{"email": "\#(address)", "display_name": "Dr X"}"#)
                #expect(created.isProblem(.unprocessableContent), "\(address): \(created.status)")
                let detail = created.json["detail"] as? String ?? ""
                #expect(detail.hasPrefix("email: ") && detail.contains(reason), "\(address): \(detail)")
                let updated = try await client.send(
                    .patch, "/v1/users/\(org.memberID.lowercased)", token: org.ownerToken,
                    json: #"{"email": "\#(address)"}"#)
                #expect(
                    updated.isProblem(.unprocessableContent) && (updated.json["detail"] as? String)?.hasPrefix("email: ") == true,
                    "\(address): \(updated.text)")
            }
            for field in ["email_from", "email_reply_to"] {
                let response = try await client.send(
                    .patch, "/v1/organisation", token: org.ownerToken,
                    json: #"{"\#(field)": "alerts@clinic..example"}"#)
                #expect(response.isProblem(.unprocessableContent))
                #expect((response.json["detail"] as? String)?.hasPrefix("\(field): ") == true, "\(response.text)")
            }
            let international = try await client.send(
                .post, "/v1/users", token: org.ownerToken,
                json: #"{"email": "dr.müller@clinic.example", "display_name": "Dr Müller"}"#)
            #expect(international.status == .created, "\(international.text)")
            #expect(international.json["email"] as? String == "dr.müller@clinic.example")
            let emails = try await org.store { tx in try await tx.users(search: nil, active: nil, limit: 100, after: nil).items.map(\.email)
            }
            #expect(
                Set(emails) == ["owner@\(org.slug).example", "member@\(org.slug).example", "dr.müller@clinic.example"],
                "nothing bad was written")
        }
    }

    @Test(
        "email: an internationalised address goes out with SMTPUTF8; every DEAD reason is a sentence, never a Swift dump (issue 8 item 9)")
    func deadReasonsAreSentences() async throws {
        let org = try await TestOrganisation.make()
        let catalogue = try await TestCatalogue.make(in: org)
        try await org.deliveryType(
            "WARD_MAIL", category: catalogue.activity, channels: [.email],
            templates: [.email: TemplateContent(subject: "Ward 3B", body: "Bed 12 needs a nurse", html: nil)])
        let (müller, refused, malformed) = try await org.store { tx in
            (
                try await tx.createUser(NewUser(email: "dr.müller@\(org.slug).example", displayName: "Dr Müller")).id,
                try await tx.createUser(NewUser(email: "fail-dr@\(org.slug).example", displayName: "Dr Fail")).id,
                // Stored before addresses were validated on the way in.
                try await tx.createUser(NewUser(email: "dr.x@clinic..example", displayName: "Dr X")).id
            )
        }
        try await org.notify(
            EventRequest(typeKey: "WARD_MAIL", audience: Audience(userIDs: [müller, refused, malformed]), payload: .object([:])))
        let deliveries = try await TestWorkers.run(org.id) { try await org.settled() }
        func delivery(_ user: UUID) throws -> Delivery { try #require(deliveries.first { $0.userID == user }) }

        #expect(try delivery(müller).status == .sent)
        let mails = try await Peers.mail(to: "dr.müller@\(org.slug).example")
        try #require(mails.count == 1)
        #expect((mails[0]["mail_options"] as? [String])?.contains("SMTPUTF8") == true)
        let mail = try ParsedMail(try #require(mails[0]["data"] as? String))
        #expect(mail.headers["To"]?.contains("<dr.müller@\(org.slug).example>") == true)

        #expect(try delivery(refused).status == .dead)
        #expect(try delivery(refused).lastError == "The mail server refused the recipient address (550 5.1.1 mailbox unavailable).")
        #expect(try delivery(malformed).status == .dead)
        #expect(
            try delivery(malformed).lastError
                == "The message could not be built: the recipient address \"dr.x@clinic..example\" cannot be used: the domain contains two dots in a row."
        )
        for id in [refused, malformed] {
            let dead = try delivery(id)
            let attempts = try await org.store { tx in try await tx.deliveryAttempts(dead.id) }
            #expect(attempts.count == 1 && attempts.first?.error == dead.lastError)
            for text in [dead.lastError ?? ""] + attempts.map({ $0.error ?? "" }) {
                #expect(!text.contains("(name:") && !text.contains("Error") && !text.contains("reason:"), "\(text)")
            }
        }
    }
}

extension TestOrganisation {
    /// Adds `count` active users (no roles), in one statement.
    func addUsers(_ count: Int) async throws {
        try await store { tx in
            _ = try await tx.connection.query(
                """
                INSERT INTO users (organisation_id, id, email, display_name)
                SELECT \(id), gen_random_uuid(), 'user' || g || '@' || \(slug) || '.example', 'User ' || g
                FROM generate_series(1, \(count)::integer) g
                """, logger: tx.logger)
        }
    }
}
