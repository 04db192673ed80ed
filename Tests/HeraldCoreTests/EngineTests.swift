import Foundation
import Testing

@testable import HeraldCore

/// Preference resolution as a table: each row is a situation and the effective value it must give.
@Suite("Preference resolution")
struct PreferenceResolutionTests {
    struct Case: Sendable, CustomTestStringConvertible {
        var name: String
        var channel: NotificationChannel
        var critical: Bool
        var typeChannels: Set<NotificationChannel>
        var user: PreferenceSetting?
        var organisation: PreferenceSetting?
        var enabled: Bool
        var frequency: Frequency
        var source: PreferenceSource
        var testDescription: String { name }
    }

    static let off = PreferenceSetting(enabled: false, frequency: .none)
    static let daily = PreferenceSetting(enabled: true, frequency: .daily)
    static let weekly = PreferenceSetting(enabled: true, frequency: .weekly)

    static let cases: [Case] = [
        Case(
            name: "type default channel, nothing set: on, immediate", channel: .email, critical: false, typeChannels: [.inApp, .email],
            user: nil, organisation: nil, enabled: true, frequency: .immediate, source: .typeDefault),
        Case(
            name: "channel outside the type's defaults: off", channel: .chat, critical: false, typeChannels: [.inApp],
            user: nil, organisation: nil, enabled: false, frequency: .none, source: .typeDefault),
        Case(
            name: "organisation default beats the type default", channel: .email, critical: false, typeChannels: [.inApp, .email],
            user: nil, organisation: daily, enabled: true, frequency: .daily, source: .organisationDefault),
        Case(
            name: "organisation default can switch a type channel off", channel: .email, critical: false, typeChannels: [.email],
            user: nil, organisation: off, enabled: false, frequency: .none, source: .organisationDefault),
        Case(
            name: "user setting beats the organisation default", channel: .email, critical: false, typeChannels: [.email],
            user: weekly, organisation: daily, enabled: true, frequency: .weekly, source: .user),
        Case(
            name: "user can switch email off", channel: .email, critical: true, typeChannels: [.inApp, .email],
            user: off, organisation: nil, enabled: false, frequency: .none, source: .user),
        Case(
            name: "critical category: in-app stays on whatever the user says", channel: .inApp, critical: true, typeChannels: [.email],
            user: off, organisation: off, enabled: true, frequency: .immediate, source: .criticalOverride),
        Case(
            name: "non-critical category: user can switch in-app off", channel: .inApp, critical: false, typeChannels: [.inApp],
            user: off, organisation: nil, enabled: false, frequency: .none, source: .user),
    ]

    @Test("precedence: critical override, user, organisation default, type default", arguments: cases)
    func resolves(_ c: Case) {
        let effective = PreferenceResolver.resolve(
            channel: c.channel, categoryIsCritical: c.critical, typeDefaultChannels: c.typeChannels,
            user: c.user, organisationDefault: c.organisation)
        #expect(effective.enabled == c.enabled)
        #expect(effective.frequency == c.frequency)
        #expect(effective.source == c.source)
    }
}

@Suite("Channel decisions and conditions")
struct ChannelDecisionTests {
    let paris = TimeZone(identifier: "Europe/Paris")!
    let outing: JSONValue = .object([
        "activity": .string("hiking"), "starts_on": .string("2026-11-21"), "level": .number(2),
        "starts_at": .string("2026-11-22T23:30:00Z"), "place": .object(["city": .string("Lyon")]),
    ])

    func decide(
        _ preference: EffectivePreference, channel: NotificationChannel = .email, throttled: Bool = false, destination: Bool = true
    ) -> ChannelDecision {
        ChannelDecider.decide(
            channel: channel, preference: preference, payload: outing, timeZone: paris, throttled: throttled, hasDestination: destination)
    }

    func preference(
        _ enabled: Bool, _ frequency: Frequency, _ conditions: [Condition] = [], source: PreferenceSource = .user
    ) -> EffectivePreference {
        EffectivePreference(enabled: enabled, frequency: frequency, conditions: conditions, source: source)
    }

    @Test("outcome and reason for each situation")
    func outcomes() {
        #expect(decide(preference(true, .immediate), channel: .inApp).reason == .inAppCreated)
        #expect(decide(preference(true, .immediate)).reason == .deliveryQueued)
        #expect(decide(preference(true, .daily)).outcome == .digest)
        #expect(decide(preference(true, .weekly)).reason == .digestQueued)
        // Digests go by email only: a webhook or chat setting of DAILY or WEEKLY sends at once
        // rather than waiting for a digest that never gathers it.
        #expect(decide(preference(true, .daily), channel: .webhook).reason == .deliveryQueued)
        #expect(decide(preference(true, .weekly), channel: .chat).outcome == .immediate)
        #expect(decide(preference(false, .immediate)).reason == .channelDisabled)
        #expect(decide(preference(true, .none)).reason == .frequencyNone)
        #expect(decide(preference(true, .immediate), throttled: true).reason == .throttled)
        #expect(decide(preference(true, .immediate), channel: .webhook, destination: false).reason == .noDestination)
        // A critical alert is never throttled out of the bell.
        #expect(decide(preference(true, .immediate, source: .criticalOverride), channel: .inApp, throttled: true).reason == .inAppCreated)
    }

    @Test(
        "conditions: equals, in, not in, weekday, nested fields",
        arguments: [
            (Condition(field: "activity", op: .equals, value: .string("hiking")), true),
            (Condition(field: "activity", op: .equals, value: .string("climbing")), false),
            (Condition(field: "activity", op: .in, values: [.string("climbing"), .string("hiking")]), true),
            (Condition(field: "activity", op: .notIn, values: [.string("hiking")]), false),
            (Condition(field: "missing", op: .notIn, values: [.string("x")]), true),
            (Condition(field: "missing", op: .in, values: [.string("x")]), false),
            (Condition(field: "level", op: .in, values: [.number(1), .number(2)]), true),
            (Condition(field: "place.city", op: .equals, value: .string("Lyon")), true),
            (Condition(field: "starts_on", op: .weekdayIn, values: [.string("saturday"), .string("sunday")]), true),
            (Condition(field: "starts_on", op: .weekdayIn, values: [.string("monday")]), false),
            // 23:30 UTC on Sunday is Monday 00:30 in Paris: the recipient's time zone decides.
            (Condition(field: "starts_at", op: .weekdayIn, values: [.string("monday")]), true),
        ])
    func conditions(_ condition: Condition, met: Bool) {
        #expect(condition.isMet(by: outing, timeZone: paris) == met)
        #expect(decide(preference(true, .weekly, [condition])).reason == (met ? .digestQueued : .conditionNotMet))
    }

    @Test(
        "conditions on the event type and the recipient's attributes; gte and lte on numbers, dates and today in the recipient's zone",
        arguments: [
            (Condition(field: "event.type", op: .in, values: [.string("OUTING_PUBLISHED")]), true),
            (Condition(field: "event.type", op: .equals, value: .string("OUTING_CHANGED")), false),
            (Condition(field: "recipient.attributes.section", op: .in, values: [.string("alpine"), .string("kayak")]), true),
            (Condition(field: "recipient.attributes.section", op: .equals, value: .string("kayak")), false),
            (Condition(field: "recipient.attributes.missing", op: .notIn, values: [.string("x")]), true),
            (Condition(field: "payload.activity", op: .equals, value: .string("hiking")), true),
            (Condition(field: "level", op: .atLeast, value: .number(2)), true),
            (Condition(field: "level", op: .atLeast, value: .number(3)), false),
            (Condition(field: "level", op: .atMost, value: .number(2)), true),
            (Condition(field: "starts_on", op: .atLeast, value: .string("2026-11-21")), true),
            (Condition(field: "starts_on", op: .atLeast, value: .string("2026-11-22")), false),
            (Condition(field: "starts_on", op: .atMost, value: .string("2026-11-20")), false),
            // At 2026-11-22T23:30Z it is already the 23rd in Paris: valid until the 22nd fails there.
            (Condition(field: "recipient.attributes.licence_valid_until", op: .atLeast, value: .string("today")), false),
            (Condition(field: "recipient.attributes.licence_valid_until", op: .atMost, value: .string("today")), true),
            (Condition(field: "recipient.attributes.renewed", op: .atLeast, value: .string("today")), true),
            (Condition(field: "recipient.attributes.missing", op: .atLeast, value: .string("today")), false),
            (Condition(field: "level", op: .atLeast, value: .string("today")), false),
            // Date-times are instants: 09:00Z is after 10:00+02:00 (08:00Z), whatever the text says.
            (Condition(field: "recipient.attributes.renewed", op: .atLeast, value: .string("2026-11-23T10:00:00+02:00")), true),
            (Condition(field: "recipient.attributes.renewed", op: .atMost, value: .string("2026-11-23T10:00:00+02:00")), false),
            (Condition(field: "recipient.attributes.renewed", op: .atMost, value: .string("2026-11-23T09:00:00.000Z")), true),
            (Condition(field: "recipient.attributes.renewed", op: .atLeast, value: .string("2026-11-23T04:30:00-05:00")), false),
            // A date with a date-time: by their dates as written.
            (Condition(field: "recipient.attributes.renewed", op: .atMost, value: .string("2026-11-23")), true),
            (Condition(field: "recipient.attributes.renewed", op: .atLeast, value: .string("2026-11-24")), false),
            (Condition(field: "starts_on", op: .atLeast, value: .string("2026-11-21T23:00:00-05:00")), true),
        ])
    func conditionsOnTypeAndRecipient(_ condition: Condition, met: Bool) throws {
        try condition.validate()
        let subject = ConditionSubject(
            payload: outing, eventType: "OUTING_PUBLISHED",
            recipientAttributes: .object([
                "section": .string("alpine"), "licence_valid_until": .string("2026-11-22"), "renewed": .string("2026-11-23T09:00:00Z"),
            ]),
            timeZone: paris, now: try Date("2026-11-22T23:30:00Z", strategy: .iso8601))
        #expect(condition.isMet(by: subject) == met)
        #expect(
            ChannelDecider.decide(
                channel: .email, preference: preference(true, .weekly, [condition]), subject: subject, throttled: false,
                hasDestination: true
            ).reason == (met ? .digestQueued : .conditionNotMet))
        // The same condition in UTC: 23:30 is still the 22nd.
        if condition.field == "recipient.attributes.licence_valid_until", condition.op == .atLeast {
            var utc = subject
            utc.timeZone = .gmt
            #expect(condition.isMet(by: utc))
        }
    }

    @Test("conditions that can never be evaluated are refused when saved")
    func invalidConditions() {
        #expect(throws: ValidationError.self) { try Condition(field: "a", op: .equals).validate() }
        #expect(throws: ValidationError.self) { try Condition(field: "a", op: .in, values: []).validate() }
        #expect(throws: ValidationError.self) { try Condition(field: "a", op: .weekdayIn, values: [.string("someday")]).validate() }
        #expect(throws: ValidationError.self) { try Condition(field: "", op: .equals, value: .bool(true)).validate() }
        #expect(throws: ValidationError.self) { try Condition(field: "event.payload", op: .equals, value: .bool(true)).validate() }
        #expect(throws: ValidationError.self) { try Condition(field: "recipient.email", op: .equals, value: .bool(true)).validate() }
        #expect(throws: ValidationError.self) { try Condition(field: "level", op: .atLeast).validate() }
        #expect(throws: ValidationError.self) { try Condition(field: "level", op: .atMost, value: .bool(true)).validate() }
        // gte and lte compare with a number, an ISO date (one the calendar has), a date-time or today.
        for text in ["yesterday", "2027-02-30", "2027-13-01", "2027-1-01", "27-01-01", "2027-01-01T25:00:00Z", ""] {
            #expect(throws: ValidationError.self, "\(text)") {
                try Condition(field: "starts_on", op: .atLeast, value: .string(text)).validate()
            }
        }
        for text in ["today", "2027-03-31", "2028-02-29", "2027-03-31T08:00:00+02:00"] {
            #expect(throws: Never.self, "\(text)") { try Condition(field: "starts_on", op: .atMost, value: .string(text)).validate() }
        }
    }
}

@Suite("Audience and planning")
struct PlannerTests {
    func profile(_ candidate: Candidate, locale: String? = nil) -> RecipientProfile {
        RecipientProfile(
            candidate: candidate, email: "\(candidate.userID)@x.example", displayName: "Dr \(candidate.userID.uuidString.prefix(4))",
            locale: locale, timezone: nil, attributes: .object([:]))
    }

    func input(
        _ recipients: [RecipientProfile], excluded: Set<UUID> = [], preferences: [UUID: [NotificationChannel: PreferenceSetting]] = [:],
        throttle: Int? = nil, recent: [UUID: Int] = [:], critical: Bool = true,
        endpoints: [NotificationChannel: [EndpointTarget]] = [:]
    ) -> PlanInput {
        let type = TypeProfile(
            id: UUID(), key: "ISQ_CRITICAL", name: "Critical ISQ", categoryID: UUID(), categoryKey: "alerts", categoryIsCritical: critical,
            defaultChannels: [.inApp, .email], defaultSeverity: .critical, defaultPriority: .critical,
            templates: [
                .inApp: [
                    "en": TemplateContent(subject: "ISQ {{payload.isq}}", body: "For {{recipient.display_name}}"),
                    "fr": TemplateContent(subject: "ISQ critique {{payload.isq}}", body: ""),
                ]
            ])
        return PlanInput(
            eventID: UUID(), type: type, severity: .critical, priority: .critical, payload: .object(["isq": .number(25)]),
            subjectType: nil, subjectID: nil, deliverAt: Date(), organisationName: "Clinic", organisationSlug: "clinic",
            organisationLocale: "en", organisationTimezone: "UTC", throttlePerMinute: throttle, recipients: recipients,
            excluded: excluded, userPreferences: preferences, organisationDefaults: [:], recentCounts: recent, endpoints: endpoints)
    }

    @Test("a subject that is missing or renders empty is the type's name, on every channel (a trial)")
    func emptySubjectIsTheTypeName() {
        let user = profile(Candidate(userID: UUID(), active: true, byUser: true), locale: "it")
        var plan = input([user])
        plan.type.templates[.inApp]?["it"] = TemplateContent(subject: "", body: "Grazie {{payload.isq}}")
        plan.type.templates[.email] = ["it": TemplateContent(subject: "{{payload.missing}} ", body: "Corpo")]
        let inApp = NotificationPlanner.render(plan, user, channel: .inApp)
        #expect(inApp.subject == "Critical ISQ" && inApp.body == "Grazie 25")
        #expect(NotificationPlanner.render(plan, user, channel: .email, escaping: .text).subject == "Critical ISQ")
        #expect(NotificationPlanner.plan(plan).notifications.first?.title == "Critical ISQ")
    }

    @Test("targeting reports the most specific rule; exclusions and inactive users are considered, not targeted")
    func targeting() {
        let (a, b, c, d, e) = (UUID(), UUID(), UUID(), UUID(), UUID())
        let decisions = AudienceResolver.decide(
            [
                Candidate(userID: a, active: true, byUser: true, byRoles: ["clinician"]),
                Candidate(userID: b, active: true, byRoles: ["nurse", "clinician"]),
                Candidate(userID: c, active: true, byGroups: ["night-shift"], byEveryone: true),
                Candidate(userID: d, active: true, byEveryone: true),
                Candidate(userID: e, active: false, byRoles: ["clinician"]),
            ], excluding: [d])
        #expect(decisions.map(\.rule) == ["user", "role:clinician", "group:night-shift", "everyone", "role:clinician"])
        #expect(decisions.map(\.reason) == [.targetedUser, .targetedRole, .targetedGroup, .excluded, .userInactive])
        #expect(decisions.map(\.targeted) == [true, true, true, false, false])
    }

    @Test("a plan renders each recipient in their locale and escapes HTML")
    func rendering() {
        let en = UUID(), fr = UUID()
        var english = profile(Candidate(userID: en, active: true, byUser: true))
        english.displayName = "<b>Bob</b>"
        let plan = NotificationPlanner.plan(input([english, profile(Candidate(userID: fr, active: true, byUser: true), locale: "fr-CA")]))
        let titles = Dictionary(uniqueKeysWithValues: plan.notifications.map { ($0.userID, $0.title) })
        #expect(titles[en] == "ISQ 25")
        #expect(titles[fr] == "ISQ critique 25")
        #expect(plan.notifications.first { $0.userID == en }?.body == "For &lt;b&gt;Bob&lt;/b&gt;")
        // What the event says to anyone, stored once per locale: the recipient's name left empty.
        let shared = Dictionary(uniqueKeysWithValues: plan.notifications.map { ($0.userID, $0.shared) })
        #expect(shared[en] == TemplateContent(subject: "ISQ 25", body: "For "))
        #expect(shared[fr]?.subject == "ISQ critique 25")
    }

    @Test("counts add up: every channel of every targeted user is decided once")
    func counts() {
        let users = (0..<5).map { _ in UUID() }
        let plan = NotificationPlanner.plan(
            input(
                users.map { profile(Candidate(userID: $0, active: true, byRoles: ["clinician"])) },
                excluded: [users[0]],
                preferences: [
                    users[1]: [.email: PreferenceSetting(enabled: false, frequency: .none)],
                    users[2]: [.email: PreferenceSetting(enabled: true, frequency: .daily)],
                ]))
        #expect(plan.counts.considered == 5)
        #expect(plan.counts.targeted == 4)
        #expect(plan.counts.notTargeted == 1)
        #expect(plan.counts.inApp == 4)
        #expect(plan.counts.immediate == 2)
        #expect(plan.counts.digest == 1)
        #expect(
            plan.counts.inApp + plan.counts.immediate + plan.counts.digest + plan.counts.skipped == 4 * NotificationChannel.allCases.count)
        #expect(plan.deliveries.count == 2 && plan.digestItems.count == 1 && plan.notifications.count == 4)
    }

    @Test("a throttled user still gets a critical event's bell row, as a critical category's; its email is throttled (a trial)")
    func criticalEventPassesTheThrottleToTheBell() {
        let user = UUID()
        var plan = input([profile(Candidate(userID: user, active: true, byUser: true))], throttle: 1, recent: [user: 5], critical: false)
        plan.priority = .critical
        let planned = NotificationPlanner.plan(plan)
        let reasons = Dictionary(uniqueKeysWithValues: planned.traces[0].channels.map { ($0.decision.channel, $0.decision.reason) })
        #expect(reasons[.inApp] == .inAppCreated && reasons[.email] == .throttled)
        plan.priority = .high
        #expect(
            NotificationPlanner.plan(plan).traces[0].channels.allSatisfy {
                $0.decision.reason == .throttled || $0.decision.outcome == .skipped
            })
        #expect(NotificationPlanner.plan(plan).notifications.isEmpty)
    }

    @Test("quiet hours hold an email until they end, in the recipient's zone, unless the event or category is critical")
    func quietHoursHoldEmail() throws {
        func at(_ text: String) -> Date { RFC3339.date(from: text)! }
        let paris = try #require(TimeZone(identifier: "Europe/Paris"))
        let nights = try #require(QuietHours(start: "22:00", end: "07:00"))
        // 23:30 in Paris (22:30 UTC in winter): inside, held until 07:00 Paris, 06:00 UTC.
        #expect(nights.heldUntil(at("2026-12-07T22:30:00Z"), in: paris) == at("2026-12-08T06:00:00Z"))
        // 06:59 is inside, 07:00 and 21:59 are not; 22:00 is.
        #expect(nights.contains(at("2026-12-08T05:59:00Z"), in: paris))
        #expect(!nights.contains(at("2026-12-08T06:00:00Z"), in: paris))
        #expect(!nights.contains(at("2026-12-08T20:59:00Z"), in: paris))
        #expect(nights.heldUntil(at("2026-12-08T21:00:00Z"), in: paris) == at("2026-12-09T06:00:00Z"))
        // A window within one day; the end follows summer time (07:00 Paris is 05:00 UTC in July).
        let lunch = try #require(QuietHours(start: "12:00", end: "13:30"))
        #expect(lunch.heldUntil(at("2026-07-01T10:15:00Z"), in: paris) == at("2026-07-01T11:30:00Z"))
        #expect(lunch.heldUntil(at("2026-07-01T11:30:00Z"), in: paris) == nil)
        #expect(nights.heldUntil(at("2026-07-01T04:00:00Z"), in: paris) == at("2026-07-01T05:00:00Z"))
        // The night the clocks go back (25 October 2026): 07:00 comes an hour later in UTC.
        #expect(nights.heldUntil(at("2026-10-24T21:00:00Z"), in: paris) == at("2026-10-25T06:00:00Z"))
        // An end in the hour the clocks repeat (Paris, 25 October 2026, 02:00–03:00 twice): an
        // email at the second 02:10 waits for the second 02:30, not the next night's.
        let early = try #require(QuietHours(start: "22:00", end: "02:30"))
        #expect(early.heldUntil(at("2026-10-25T01:10:00Z"), in: paris) == at("2026-10-25T01:30:00Z"))
        #expect(early.heldUntil(at("2026-10-24T23:10:00Z"), in: paris) == at("2026-10-25T00:30:00Z"))
        // An end in the hour the clocks skip (29 March 2026, 02:00–03:00): at the transition.
        #expect(early.heldUntil(at("2026-03-28T23:00:00Z"), in: paris) == at("2026-03-29T01:00:00Z"))
        // What is not a window.
        #expect(QuietHours(start: "22:00", end: "22:00") == nil)
        for text in ["7:00", "24:00", "07:60", "07-00", "0700", " 07:00", "07:00:00", "ab:cd", "٠٧:٠٠"] {
            #expect(QuietHours.minutes(text) == nil, "\(text)")
        }
        #expect(QuietHours.minutes("23:59") == 1439 && QuietHours.text(425) == "07:05")

        // The planner: the email of a recipient inside their quiet hours is due when they end, with
        // its own reason; the in-app row is not held; someone else's email is not held.
        let (sleeper, awake) = (UUID(), UUID())
        var sleeping = profile(Candidate(userID: sleeper, active: true, byUser: true))
        sleeping.timezone = "Europe/Paris"
        sleeping.quietHours = nights
        var plan = input([sleeping, profile(Candidate(userID: awake, active: true, byUser: true))], critical: false)
        plan.priority = .normal
        plan.deliverAt = at("2026-12-07T22:30:00Z")
        let planned = NotificationPlanner.plan(plan)
        let held = try #require(planned.deliveries.first { $0.userID == sleeper })
        #expect(held.notBefore == at("2026-12-08T06:00:00Z"))
        #expect(planned.deliveries.first { $0.userID == awake }?.notBefore == nil)
        let email = planned.traces.first { $0.targeting.userID == sleeper }?.channels.first { $0.decision.channel == .email }
        #expect(email?.decision.reason == .heldForQuietHours && email?.decision.outcome == .immediate)
        #expect(planned.counts.immediate == 2 && planned.notifications.count == 2)
        // An event that expires before the quiet hours end queues no email for the sleeper.
        var brief = plan
        brief.expiresAt = at("2026-12-08T05:00:00Z")
        let briefPlan = NotificationPlanner.plan(brief)
        #expect(briefPlan.deliveries.map(\.userID) == [awake])
        let skipped = briefPlan.traces.first { $0.targeting.userID == sleeper }?.channels.first { $0.decision.channel == .email }
        #expect(skipped?.decision.outcome == .skipped && skipped?.decision.reason == .expiresInQuietHours)
        brief.expiresAt = at("2026-12-08T06:00:01Z")
        #expect(NotificationPlanner.plan(brief).deliveries.count == 2)
        // A critical event, or an event of a critical category, is sent at once.
        var urgent = plan
        urgent.priority = .critical
        #expect(NotificationPlanner.plan(urgent).deliveries.allSatisfy { $0.notBefore == nil })
        var alarm = plan
        alarm.type.categoryIsCritical = true
        #expect(NotificationPlanner.plan(alarm).deliveries.allSatisfy { $0.notBefore == nil })
        // Outside the window nothing is held.
        plan.deliverAt = at("2026-12-08T09:00:00Z")
        #expect(NotificationPlanner.plan(plan).deliveries.allSatisfy { $0.notBefore == nil })
    }

    @Test("webhook and chat: one delivery per recipient per matching endpoint, NO_DESTINATION without one")
    func endpoints() {
        let user = UUID()
        let hooks = [EndpointTarget(id: UUID(), url: "https://a.example/hook"), EndpointTarget(id: UUID(), url: "https://b.example/hook")]
        var planned = input([profile(Candidate(userID: user, active: true, byUser: true))], endpoints: [.webhook: hooks])
        planned.organisationDefaults = [
            .webhook: PreferenceSetting(enabled: true, frequency: .immediate),
            .chat: PreferenceSetting(enabled: true, frequency: .immediate),
        ]
        let plan = NotificationPlanner.plan(planned)
        let webhook = plan.deliveries.filter { $0.channel == .webhook }
        #expect(webhook.map(\.endpointID) == hooks.map(\.id))
        #expect(webhook.map(\.destination) == hooks.map(\.url))
        let channels = plan.traces[0].channels
        #expect(channels.first { $0.decision.channel == .webhook }?.deliveryIDs == webhook.map(\.id))
        #expect(channels.first { $0.decision.channel == .chat }?.decision.reason == .noDestination)
        #expect(plan.counts.immediate == 3) // the email and two webhooks
    }

    @Test("a user's own webhook and chat settings do not apply: the organisation's endpoints follow its defaults and the type (a trial)")
    func endpointChannelsAreNotPersonal() {
        let user = UUID()
        let hook = [EndpointTarget(id: UUID(), url: "https://a.example/hook")]
        let chat = [EndpointTarget(id: UUID(), url: "https://chat.example/hook")]
        // The user switched the team's chat on and the backend's webhook off, for themself.
        var planned = input(
            [profile(Candidate(userID: user, active: true, byUser: true))],
            preferences: [
                user: [
                    .webhook: PreferenceSetting(enabled: false, frequency: .none),
                    .chat: PreferenceSetting(enabled: true, frequency: .immediate),
                ]
            ], endpoints: [.webhook: hook, .chat: chat])
        planned.type.defaultChannels = [.inApp, .email, .webhook]
        let channels = NotificationPlanner.plan(planned).traces[0].channels
        let webhook = channels.first { $0.decision.channel == .webhook }?.decision
        #expect(webhook?.reason == .deliveryQueued && webhook?.preference.source == .typeDefault)
        let teamChat = channels.first { $0.decision.channel == .chat }?.decision
        #expect(teamChat?.reason == .channelDisabled && teamChat?.preference.source == .typeDefault)
        // Email stays the user's to switch off.
        planned.userPreferences[user]?[.email] = PreferenceSetting(enabled: false, frequency: .none)
        #expect(
            NotificationPlanner.plan(planned).traces[0].channels.first { $0.decision.channel == .email }?.decision.reason
                == .channelDisabled)
    }

    @Test("the throttle skips a user at the limit, but never a critical in-app alert")
    func throttle() {
        let busy = UUID(), calm = UUID()
        let recipients = [
            profile(Candidate(userID: busy, active: true, byUser: true)), profile(Candidate(userID: calm, active: true, byUser: true)),
        ]
        let critical = NotificationPlanner.plan(input(recipients, throttle: 20, recent: [busy: 20]))
        let trace = critical.traces.first { $0.targeting.userID == busy }!
        #expect(trace.channels.first { $0.decision.channel == .email }?.decision.reason == .throttled)
        #expect(trace.channels.first { $0.decision.channel == .inApp }?.decision.reason == .inAppCreated)
        var normal = input(recipients, throttle: 20, recent: [busy: 20], critical: false)
        normal.priority = .normal
        let ordinary = NotificationPlanner.plan(normal)
        #expect(ordinary.traces.first { $0.targeting.userID == busy }!.channels.allSatisfy { $0.decision.outcome == .skipped })
        #expect(ordinary.notifications.map(\.userID) == [calm])
    }

    @Test("feed ids are time-ordered UUID v7 and the read-all bound covers the millisecond")
    func timeOrderedIDs() {
        let now = Date()
        let earlier = TimeOrderedID.make(at: now.addingTimeInterval(-1))
        let id = TimeOrderedID.make(at: now)
        let bound = TimeOrderedID.upperBound(at: now)
        #expect(earlier.uuidString < id.uuidString)
        #expect(id.uuidString <= bound.uuidString)
        #expect(bound.uuidString < TimeOrderedID.make(at: now.addingTimeInterval(0.002)).uuidString)
        #expect(id.uuidString.dropFirst(14).first == "7")
        // The lower bound (the deliveries list's `since`) sorts at or below every id of its
        // millisecond and above every id of the one before.
        let floor = TimeOrderedID.lowerBound(at: now)
        #expect(floor.uuidString <= id.uuidString)
        #expect(TimeOrderedID.make(at: now.addingTimeInterval(-0.002)).uuidString < floor.uuidString)
        #expect((0..<200).allSatisfy { _ in floor.uuidString <= TimeOrderedID.make(at: now).uuidString })
    }

    @Test("an in-app title and body are bounded (1 000 and 10 000 characters), cut with an ellipsis and never inside an entity")
    func inAppTextBounded() {
        let long = String(repeating: "x", count: 5_000)
        #expect(InAppText.cut(long, to: 1_000) == String(repeating: "x", count: 999) + "…")
        #expect(InAppText.cut("short", to: 1_000) == "short")
        let entity = String(repeating: "y", count: 996) + "&amp;zz"
        #expect(InAppText.cut(entity, to: 1_000) == String(repeating: "y", count: 996) + "…")
        let bounded = InAppText.bounded(TemplateContent(subject: long, body: long + long + long))
        #expect(bounded.body.count == 10_000 && bounded.body.hasSuffix("x…"))
        let exact = InAppText.bounded(TemplateContent(subject: "t", body: long + long))
        #expect(bounded.subject.count == 1_000 && exact.body == long + long)
    }

    @Test("ids drawn from the random pool across many refills: all distinct, version 7, RFC 4122 variant, random bits spread")
    func randomPool() {
        let now = Date()
        let ids = (0..<5_000).map { _ in TimeOrderedID.make(at: now) }
        #expect(Set(ids).count == ids.count)
        for id in ids {
            let bytes = id.uuid
            #expect(bytes.6 >> 4 == 7 && bytes.8 >> 6 == 0b10)
        }
        // Each random bit of the low half is set in about half of the ids (not a zeroed pool).
        let lows = ids.map { UInt64(bigEndian: withUnsafeBytes(of: $0.uuid) { $0.loadUnaligned(fromByteOffset: 8, as: UInt64.self) }) }
        for bit in 0..<62 {
            let set = lows.filter { $0 & (1 << UInt64(bit)) != 0 }.count
            #expect((2_000...3_000).contains(set), "bit \(bit): \(set) of 5000")
        }
    }

    @Test(
        "what would reach the parser's recursion is refused before parsing: over 100 sections, over 8 nested transforms, delimiter changes (a trial crashed the server with 800 nested sections)"
    )
    func parserRecursionBounded() {
        func nested(_ depth: Int, open: String = "{{", close: String = "}}", sigil: String = "#", between: String = "") -> String {
            (0..<depth).map { "\(open)\(sigil)a\($0)\(close)" }.joined() + "x"
                + (0..<depth).reversed().map { "\(between)\(open)/a\($0)\(close)" }.joined()
        }
        #expect(throws: Never.self) { try TemplateRenderer.validate(nested(100), field: "body") }
        #expect(throws: Never.self) {
            try TemplateRenderer.validate("{{uppercased(trimmed(payload.title))}} (((not a tag)))", field: "body")
        }
        #expect(TemplateRenderer.render(nested(3), ["a0": true, "a1": true, "a2": true]) == "x")
        let transforms = (0..<9).map { _ in "a(" }.joined() + "b" + String(repeating: ")", count: 9)
        let refused: [(String, String, String)] = [
            (nested(101), "more than 100 sections", "one too many"), (nested(101, sigil: "^"), "more than 100 sections", "inverted"),
            (nested(800), "more than 100 sections", "the trial's"), (nested(100_000), "more than 100 sections", "a megabyte of them"),
            ("{{#a}}" + nested(110, sigil: "$"), "more than 100 sections", "blocks"),
            // A close the parser reads as text (a prepended character joins its brace) cannot
            // lower a count (the review's way past a depth counter).
            (
                String(repeating: "{{#a}}\u{600}{{/a}}", count: 150) + String(repeating: "{{/a}}", count: 150), "more than 100 sections",
                "hidden closes"
            ),
            ("{{=<% %>=}}" + nested(5_000, open: "<%", close: "%>"), "changing the delimiters", "other delimiters"),
            ("{{=<%\n%>=}}" + nested(5_000, open: "<%", close: "%>"), "changing the delimiters", "a newline in the delimiters"),
            ("a {{" + transforms + "}}", "more than 8 transforms", "nine transforms"),
            ("{{ " + String(repeating: "a(", count: 20_000) + "b}}", "more than 8 transforms", "twenty thousand"),
        ]
        for (source, said, comment) in refused {
            do {
                try TemplateRenderer.validate(source, field: "body")
                Issue.record("\(comment) was accepted")
            } catch {
                #expect(error.field == "body" && error.message.contains(said), "\(comment): \(error.message)")
            }
        }
        // What was saved before the limits renders as its source instead of reaching the parser.
        let stored = nested(800)
        #expect(TemplateRenderer.render(stored, [:]) == stored)
        #expect(TemplateRenderer.render(TemplateContent(subject: stored, body: "b"), [:]).subject == stored)
    }

    @Test("a name that holds other names prints as compact JSON, never Swift's description of it (a trial)")
    func objectsPrintAsJSON() {
        let attributes = JSONValue.object(["team": .string("a&b"), "level": .number(3), "tags": .array([.string("x")])])
        let context: [String: Any] = [
            "recipient": ["display_name": "Ana", "attributes": attributes.plain, "active": true] as [String: Any],
            "links": ["unsubscribe": "https://h.test/u"],
            "payload": JSONValue.object(["n": .number(1.5)]).plain,
        ]
        #expect(
            TemplateRenderer.render("{{{recipient}}}", context)
                == #"{"active":true,"attributes":{"level":3,"tags":["x"],"team":"a&b"},"display_name":"Ana"}"#)
        #expect(TemplateRenderer.render("{{recipient}}", context).contains("&quot;team&quot;:&quot;a&amp;b&quot;"))
        #expect(TemplateRenderer.render("{{{links}}}", context) == #"{"unsubscribe":"https://h.test/u"}"#)
        let whole = TemplateRenderer.render("{{{.}}}", context)
        #expect(whole.hasPrefix(#"{"links":{"unsubscribe""#) && !whole.contains("HeraldCore"), "\(whole)")
        // Sections still enter them.
        #expect(TemplateRenderer.render("{{#recipient}}{{display_name}}{{/recipient}}", context) == "Ana")
    }

    @Test("templates are validated with the line of the error, and pick the locale")
    func templates() {
        #expect(throws: ValidationError.self) { try TemplateRenderer.validate("Hello\n{{#items}}\n{{name}}", field: "body") }
        do {
            try TemplateRenderer.validate("Hello\n{{#items}}\n{{name}}", field: "body")
        } catch {
            #expect(error.message.contains("line"))
        }
        // In words, not the parser's names (`overflow`, `expectedSectionEnd`, …).
        for (source, said) in [
            ("Hi {{payload.x", "never closed with }}"), ("{{#items}}x", "never closed ({{#name}}"),
            ("{{#a}}x{{/b}}", "closed with another name"),
            // What the parser let through and rendered as nothing (a trial).
            ("ok {{", "line 1, column 4: a tag opened with {{ is never closed with }}"),
            ("a\nb {{>partial}}", "line 2, column 3: partials"),
            ("{{}}", "a tag has no name"), ("{{ }}", "a tag has no name"), ("{{% NOT_A_PRAGMA }}", "pragma is not one Mustache knows"),
        ] {
            do {
                try TemplateRenderer.validate(source, field: "subject")
                Issue.record("\(source) was accepted")
            } catch {
                #expect(error.message.contains(said), "\(source): \(error.message)")
            }
        }
        // What renders stays accepted: a triple mustache, a comment, a section, a pragma.
        for source in ["{{{payload.html}}} {{! note }} {{#a}}x{{/a}}", "{{% CONTENT_TYPE: TEXT}}{{x}}", "no tags at all"] {
            #expect(throws: Never.self, "\(source)") { try TemplateRenderer.validate(source, field: "body") }
        }
        let byLocale = ["en": "en", "fr": "fr", "de-AT": "de-AT"]
        #expect(TemplateRenderer.pick(byLocale, userLocale: "fr-CA", organisationLocale: "de")?.value == "fr")
        #expect(TemplateRenderer.pick(byLocale, userLocale: "de-AT", organisationLocale: "fr")?.value == "de-AT")
        #expect(TemplateRenderer.pick(byLocale, userLocale: nil, organisationLocale: "it")?.value == "en")
        #expect(TemplateRenderer.pick(["es": "es"], userLocale: "fr", organisationLocale: "it") == nil)
        // RFC 4647 lookup: every shorter tag before the language, a singleton with its subtag.
        let chinese = ["zh": "zh", "zh-Hant": "zh-Hant"]
        #expect(TemplateRenderer.pick(chinese, userLocale: "zh-Hant-TW", organisationLocale: "en")?.value == "zh-Hant")
        #expect(TemplateRenderer.pick(chinese, userLocale: "zh-Hans-CN", organisationLocale: "en")?.value == "zh")
        #expect(
            TemplateRenderer.pick(["sr-Latn": "sr-Latn"], userLocale: "sr-Latn-RS-x-work", organisationLocale: "en")?.value == "sr-Latn")
    }
}

@Suite("Retry policy")
struct RetryPolicyTests {
    let policy = RetryPolicy(baseDelay: 10, factor: 2, maximumDelay: 300, maximumAttempts: 6, jitter: 0.2)
    let now = Date(timeIntervalSince1970: 1_000_000)

    @Test("exponential, capped", arguments: [(1, 10.0), (2, 20.0), (3, 40.0), (5, 160.0), (6, 300.0), (20, 300.0)])
    func delays(attempt: Int, expected: Double) {
        #expect(policy.delay(after: attempt) == expected)
    }

    @Test("jitter stays within its share of the delay")
    func jitter() {
        let low = policy.nextAttempt(after: 3, failedAt: now, random: 0)!.timeIntervalSince(now)
        let high = policy.nextAttempt(after: 3, failedAt: now, random: 0.999_999)!.timeIntervalSince(now)
        #expect(abs(low - 32) < 0.001)
        #expect(high > 39.99 && high <= 40)
    }

    @Test("a receiver's Retry-After wins when longer, within the cap")
    func retryAfter() {
        #expect(policy.nextAttempt(after: 1, failedAt: now, retryAfter: 120, random: 0.5)!.timeIntervalSince(now) == 120)
        #expect(policy.nextAttempt(after: 1, failedAt: now, retryAfter: 5, random: 0.5)!.timeIntervalSince(now) == 9)
        #expect(policy.nextAttempt(after: 1, failedAt: now, retryAfter: 99_999, random: 0.5)!.timeIntervalSince(now) == 300)
    }

    @Test("no next attempt after the last one: the delivery goes DEAD")
    func dead() {
        #expect(policy.nextAttempt(after: 5, failedAt: now, random: 0.5) != nil)
        #expect(policy.nextAttempt(after: 6, failedAt: now, random: 0.5) == nil)
    }
}
