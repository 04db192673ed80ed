import Foundation
import HeraldCore
import HeraldStore
import Logging
import Metrics
import Synchronization

// Digest runs, the second kind of work on the runner (issue 11): `DigestQueue` claims due runs
// (`claim_digest_runs` makes the runs of every slot that has come first), `DigestHandler`
// readies one (attaches its items on the first attempt, drops what no longer qualifies),
// renders it and hands it to the SMTP server. Completion marks the items sent, fenced, in one
// transaction: an item is in one digest at most, and in none only if it was dropped.

extension ClaimedDigestRun: WorkClaim {
    public var logMetadata: Logger.Metadata {
        ["organisation_id": .string(organisationID.lowercased), "digest_run_id": .string(runID.lowercased), "attempt": "\(attempt)"]
    }
}

/// How one attempt to send a digest ended.
public struct DigestAttemptRecord: Sendable {
    public var result: AttemptResult
    /// Every item was dropped at send time: nothing was sent, and the run ends EMPTY.
    public var empty: Bool
    public var items: Int
}

/// Digest runs as a `WorkQueue`. Due times follow `now` (tests inject a clock); leases run on
/// the database's clock.
public final class DigestQueue: WorkQueue {
    let database: Database
    let organisation: UUID?
    let now: @Sendable () -> Date
    /// When this queue last made runs: claims between two polls only lease (making runs looks
    /// at every due item without a run, which costs far more than leasing).
    private let lastMade = Mutex<ContinuousClock.Instant?>(nil)
    /// How often a claim also makes runs.
    static let makeEvery: Duration = .milliseconds(500)

    public init(database: Database, organisation: UUID?, now: @escaping @Sendable () -> Date = { Date() }) {
        self.database = database
        self.organisation = organisation
        self.now = now
    }

    public var kind: String { "digest" }

    /// Digests come due with time, not with a notify: the runner's poll finds them.
    public func wakes(on message: BusMessage) -> Bool { false }

    public func claim(worker: String, limit: Int, leaseSeconds: Int) async throws -> [ClaimedDigestRun] {
        let make = lastMade.withLock { last in
            let due = last.map { ContinuousClock.now - $0 >= Self.makeEvery } ?? true
            if due { last = .now }
            return due
        }
        let claims = try await database.claimDigestRuns(
            worker: worker, limit: limit, leaseSeconds: leaseSeconds, now: now(), organisation: organisation, makeRuns: make)
        // Nothing left to lease but runs may be waiting to be made: make them at once.
        if claims.isEmpty, !make {
            lastMade.withLock { $0 = .now }
            return try await database.claimDigestRuns(
                worker: worker, limit: limit, leaseSeconds: leaseSeconds, now: now(), organisation: organisation, makeRuns: true)
        }
        return claims
    }

    public func heartbeat(worker: String, organisation: UUID, claims: [ClaimedDigestRun], leaseSeconds: Int) async throws {
        try await database.withTenant(organisation) { tx in
            try await tx.extendDigestLeases(worker: worker, claims: claims, leaseSeconds: leaseSeconds)
        }
    }

    public func complete(
        _ claim: ClaimedDigestRun, worker: String, startedAt: Date, outcome: DigestAttemptRecord, logger: Logger
    ) async throws -> Bool {
        try await database.withTenant(claim.organisationID) { tx in
            try await tx.completeDigestRun(claim, worker: worker, result: outcome.result, empty: outcome.empty)
        }
    }

    public func release(_ claim: ClaimedDigestRun, worker: String, until: Date, reason: String) async throws -> Bool {
        try await database.withTenant(claim.organisationID) { tx in
            try await tx.releaseDigestRun(claim, worker: worker, until: until)
        }
    }

    /// Nothing: the lease expires and the next claim puts the run back (or DEAD).
    public func fail(_ claim: ClaimedDigestRun, worker: String, error: any Error) async throws {}

    /// Nothing apart: `claim_digest_runs` rescues expired leases before each claim.
    public func rescueExpired(worker: String) async throws -> Int { 0 }
}

/// The fence refused a run before it was sent: another worker holds it now.
struct DigestLeaseLost: Error, CustomStringConvertible {
    var description: String { "the digest run's lease moved on before it was sent" }
}

/// Readies, renders and sends one digest run.
public struct DigestHandler: WorkHandler {
    let database: Database
    let email: EmailTransport
    let links: LinkBuilder
    let retry: RetryPolicy
    /// The runner's name: the lease owner the run is fenced on.
    let worker: String
    let now: @Sendable () -> Date

    static let sent = Counter(label: "herald_digests_total", dimensions: [("outcome", "sent")])
    static let empty = Counter(label: "herald_digests_total", dimensions: [("outcome", "empty")])
    static let failed = Counter(label: "herald_digests_total", dimensions: [("outcome", "failed")])

    public init(
        database: Database, email: EmailTransport, links: LinkBuilder, retry: RetryPolicy, worker: String,
        now: @escaping @Sendable () -> Date = { Date() }
    ) {
        self.database = database
        self.email = email
        self.links = links
        self.retry = retry
        self.worker = worker
        self.now = now
    }

    public func handle(_ claim: ClaimedDigestRun, logger: Logger) async throws -> WorkDisposition<DigestAttemptRecord> {
        let now = now()
        guard
            let work = try await database.withTenant(
                claim.organisationID, { tx in try await tx.prepareDigest(claim, worker: worker, now: now) })
        else { throw DigestLeaseLost() }
        if !work.dropped.isEmpty {
            logger.info(
                "digest items dropped at send time",
                metadata: ["dropped": "\(work.dropped.count)", "reasons": "\(Set(work.dropped.values.map(\.rawValue)).sorted())"])
        }
        guard let first = work.entries.first else {
            return .done(DigestAttemptRecord(result: .sent(responseCode: nil, response: "Nothing left to send."), empty: true, items: 0))
        }
        let message: [UInt8]
        let from = first.rendering.email.from ?? email.defaultFrom
        do {
            message = try DigestMessage(work: work, links: links, defaultFrom: email.defaultFrom, now: now).encoded()
        } catch {
            return .done(
                DigestAttemptRecord(
                    result: .dead(responseCode: nil, error: "The digest could not be built: \(error)"), empty: false,
                    items: work.entries.count))
        }
        let outcome = await email.send(from: from, to: first.rendering.recipient.email, message: message)
        if case .deferred(let reason) = outcome { return .giveBack(until: now.addingTimeInterval(2), reason: reason) }
        if case .paused(let until, let reason) = outcome { return .giveBack(until: until, reason: reason) }
        let result = outcome.result(attempt: claim.attempt, maxAttempts: work.run.maxAttempts, policy: retry, now: now)
        return .done(DigestAttemptRecord(result: result, empty: false, items: work.entries.count))
    }

    public func finished(
        _ claim: ClaimedDigestRun, disposition: WorkDisposition<DigestAttemptRecord>?, recorded: Bool?, duration: Duration, logger: Logger
    ) {
        guard case .done(let record) = disposition, recorded == true else { return }
        switch record.result {
        case .sent where record.empty:
            Self.empty.increment()
            logger.info("digest empty at send time: nothing sent")
        case .sent:
            Self.sent.increment()
            logger.info("digest sent", metadata: ["items": "\(record.items)"])
        case .failed(_, let error, _), .dead(_, let error), .cancelled(let error):
            Self.failed.increment()
            logger.warning("digest not sent", metadata: ["error": .string(error)])
        }
    }
}

/// The email of one digest run: the items grouped by category (in the order they first
/// appear), each with its title, a short body and a tracked link when the event names a URL;
/// HTML and text; `List-Unsubscribe` with one-click unsubscribe (RFC 8058) from the email of
/// every category the digest carries. The Message-ID is the run's, so
/// every retry sends the same message.
struct DigestMessage {
    let work: DigestWork
    let links: LinkBuilder
    let defaultFrom: String
    let now: Date

    /// At most this many characters of an item's body.
    static let bodyLimit = 280

    struct Item {
        var title: String
        var body: String
        var link: String?
    }

    func sections() -> [(category: String, items: [Item])] {
        var order: [String] = []
        var byCategory: [String: [Item]] = [:]
        for entry in work.entries {
            let rendering = entry.rendering
            // The in-app wording, written to be read in a list (as in the bell), rather than the
            // email's, a whole letter with its greeting that each item of a digest repeated; the
            // email's when the type has only that.
            let templates = rendering.input.type.templates
            let channel: NotificationChannel =
                (templates[.inApp] ?? [:]).isEmpty && !(templates[.email] ?? [:]).isEmpty ? .email : .inApp
            // As written (not HTML-escaped): the digest template escapes its HTML part itself.
            let content = NotificationPlanner.render(rendering.input, rendering.recipient, channel: channel, escaping: .text)
            var body = content.body.trimmingCharacters(in: .whitespacesAndNewlines)
            if body.count > Self.bodyLimit { body = String(body.prefix(Self.bodyLimit - 1)) + "…" }
            let link = rendering.url.map { _ in click(entry) }
            if byCategory[rendering.categoryName] == nil { order.append(rendering.categoryName) }
            byCategory[rendering.categoryName, default: []].append(Item(title: content.subject, body: body, link: link))
        }
        return order.map { ($0, byCategory[$0] ?? []) }
    }

    /// The tracked link of an item: the click is recorded against the digest item.
    func click(_ entry: DigestEntry) -> String {
        let claims = LinkClaims(
            scope: .click, organisationID: work.organisationID, userID: work.run.userID, digestItemID: entry.itemID,
            expiresAt: now.addingTimeInterval(links.clickLifetime))
        return "\(links.baseURL)/v1/links/\(links.keys.sign(claims))"
    }

    func unsubscribe() -> String {
        // The run: one-click unsubscribes from every category this digest carried.
        let claims = LinkClaims(
            scope: .unsubscribe, organisationID: work.organisationID, userID: work.run.userID, digestRunID: work.run.id,
            channel: NotificationChannel.email.rawValue, expiresAt: now.addingTimeInterval(links.unsubscribeLifetime))
        return "\(links.baseURL)/v1/unsubscribe/\(links.keys.sign(claims))"
    }

    /// What the digest template sees (see `DigestTemplate`).
    func context(unsubscribe: String) -> [String: Any] {
        let first = work.entries[0].rendering
        let count = work.entries.count
        return [
            "recipient": ["display_name": first.recipient.displayName, "email": first.recipient.email],
            "organisation": ["name": first.input.organisationName],
            "cadence": work.run.frequency == .weekly ? "weekly" : "daily",
            "count": count, "count_text": "\(count) notification\(count == 1 ? "" : "s")",
            "sections": sections().map { section -> [String: Any] in
                [
                    "category": section.category,
                    "items": section.items.map { item -> [String: Any] in
                        var values: [String: Any] = ["title": item.title]
                        if !item.body.isEmpty { values["body"] = item.body }
                        if let link = item.link { values["link"] = link }
                        return values
                    },
                ]
            },
            "links": ["unsubscribe": unsubscribe],
        ]
    }

    func encoded() throws -> [UInt8] {
        let first = work.entries[0].rendering
        let organisation = first.input.organisationName
        let unsubscribe = unsubscribe()
        // The organisation's template for the recipient's locale, else the built-in default.
        var template =
            TemplateRenderer.pick(work.templates, userLocale: first.recipient.locale, organisationLocale: first.input.organisationLocale)?
            .value ?? DigestTemplate.builtIn
        template.html = template.html.map(DigestTemplate.escapingEveryValue)
        // The subject and the text part unescaped, the HTML part escaped (as a per-event email).
        let content = TemplateRenderer.render(template, context(unsubscribe: unsubscribe), escaping: .text)
        let (subject, text, html) = (content.subject.trimmingCharacters(in: .whitespacesAndNewlines), content.body, content.html)
        let from = first.email.from ?? defaultFrom
        return try MIMEMessage(
            from: .init(from, name: first.email.fromName ?? organisation),
            replyTo: first.email.replyTo.map { .init($0) },
            to: .init(first.recipient.email, name: first.recipient.displayName),
            subject: subject, textBody: text, htmlBody: html,
            messageID: "digest-\(work.run.id.lowercased)@\(from.split(separator: "@").last.map(String.init) ?? "herald")",
            // When the message was written (the wall clock), not the instant the run was decided
            // for: `herald digests send --at` tomorrow must not date today's mail tomorrow.
            date: Date(),
            extraHeaders: [("List-Unsubscribe", "<\(unsubscribe)>"), ("List-Unsubscribe-Post", "List-Unsubscribe=One-Click")]
        ).encoded()
    }
}
