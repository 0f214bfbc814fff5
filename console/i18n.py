"""The console's words in English and Russian, the field's lingua franca.

Every string a page shows is a key here with its text in both catalogues
(a test keeps their keys equal and every key a template uses present).
Placeholders are ``{name}``, filled by `translate`. What comes from
elsewhere is shown as it is: a schema's help text, a refusal's detail,
participant ids and case references.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from types import MappingProxyType

from sqlalchemy.engine import Engine

from broker.casepolicy import Stage
from broker.database import storage_errors
from schemas.base import MessageKind

LANGUAGES = ("en", "ru")
DEFAULT_LANGUAGE = "en"

Translate = Callable[..., str]

_KINDS_EN = {
    MessageKind.RETURN_REQUEST: "Return request",
    MessageKind.RETURN_ACCEPTED: "Return accepted",
    MessageKind.RETURN_DECLINED: "Return declined",
    MessageKind.TRAVEL_ARRANGED: "Travel arranged",
    MessageKind.DEPARTED: "Departed",
    MessageKind.RECEPTION_CONFIRMED: "Reception confirmed",
    MessageKind.REINTEGRATION_UPDATE: "Reintegration update",
    MessageKind.CASE_CLOSED: "Case closed",
    MessageKind.REFERRAL_REQUEST: "Referral request",
    MessageKind.REFERRAL_ACCEPTED: "Referral accepted",
    MessageKind.REFERRAL_DECLINED: "Referral declined",
    MessageKind.SERVICE_STARTED: "Service started",
    MessageKind.SERVICE_COMPLETED: "Service completed",
    MessageKind.CONSENT_WITHDRAWN: "Consent withdrawn",
    MessageKind.REQUEST_WITHDRAWN: "Request withdrawn",
    MessageKind.DELIVERY_RECEIPT: "Delivery receipt",
    MessageKind.REMINDER: "Reminder",
    MessageKind.ERASURE_CONFIRMED: "Erasure confirmed",
}
_KINDS_RU = {
    MessageKind.RETURN_REQUEST: "Запрос о возвращении",
    MessageKind.RETURN_ACCEPTED: "Возвращение принято",
    MessageKind.RETURN_DECLINED: "В возвращении отказано",
    MessageKind.TRAVEL_ARRANGED: "Поездка организована",
    MessageKind.DEPARTED: "Выезд состоялся",
    MessageKind.RECEPTION_CONFIRMED: "Приём подтверждён",
    MessageKind.REINTEGRATION_UPDATE: "Сведения о реинтеграции",
    MessageKind.CASE_CLOSED: "Дело закрыто",
    MessageKind.REFERRAL_REQUEST: "Запрос о переадресации",
    MessageKind.REFERRAL_ACCEPTED: "Переадресация принята",
    MessageKind.REFERRAL_DECLINED: "В переадресации отказано",
    MessageKind.SERVICE_STARTED: "Услуги начаты",
    MessageKind.SERVICE_COMPLETED: "Услуги завершены",
    MessageKind.CONSENT_WITHDRAWN: "Согласие отозвано",
    MessageKind.REQUEST_WITHDRAWN: "Запрос отозван",
    MessageKind.DELIVERY_RECEIPT: "Подтверждение доставки",
    MessageKind.REMINDER: "Напоминание",
    MessageKind.ERASURE_CONFIRMED: "Удаление подтверждено",
}
_STAGES_EN = {
    Stage.REQUESTED: "requested",
    Stage.ACCEPTED: "accepted",
    Stage.DECLINED: "declined",
    Stage.TRAVEL_ARRANGED: "travel arranged",
    Stage.DEPARTED: "departed",
    Stage.RECEIVED: "received",
    Stage.REINTEGRATION: "reintegration",
    Stage.CLOSED: "closed",
    Stage.HALTED: "halted (consent withdrawn)",
    Stage.WITHDRAWN: "request withdrawn",
    Stage.REFERRAL_REQUESTED: "referral requested",
    Stage.REFERRAL_ACCEPTED: "referral accepted",
    Stage.REFERRAL_DECLINED: "referral declined",
    Stage.SERVICE_STARTED: "service started",
    Stage.SERVICE_COMPLETED: "service completed",
}
_STAGES_RU = {
    Stage.REQUESTED: "запрошено",
    Stage.ACCEPTED: "принято",
    Stage.DECLINED: "отказано",
    Stage.TRAVEL_ARRANGED: "поездка организована",
    Stage.DEPARTED: "выехал(а)",
    Stage.RECEIVED: "принят(а)",
    Stage.REINTEGRATION: "реинтеграция",
    Stage.CLOSED: "закрыто",
    Stage.HALTED: "остановлено (согласие отозвано)",
    Stage.WITHDRAWN: "запрос отозван",
    Stage.REFERRAL_REQUESTED: "переадресация запрошена",
    Stage.REFERRAL_ACCEPTED: "переадресация принята",
    Stage.REFERRAL_DECLINED: "в переадресации отказано",
    Stage.SERVICE_STARTED: "услуги начаты",
    Stage.SERVICE_COMPLETED: "услуги завершены",
}

_EN: dict[str, str] = {
    "nav.label": "Sections",
    "nav.inbox": "Inbox",
    "nav.cases": "Cases",
    "nav.outbox": "Outbox",
    "nav.quarantine": "Quarantine",
    "nav.audit": "Audit",
    "nav.new.return_request": "New return request",
    "nav.new.referral_request": "New referral",
    "role.case_worker": "case worker",
    "role.supervisor": "supervisor",
    "role.read_only": "read only",
    "language.switch": "Русский",
    "logout": "Sign out",
    "yes": "yes",
    "no": "no",
    "cancel": "Cancel",
    "back": "Back",
    "back_home": "Back to the start page",
    "login.title": "Sign in",
    "login.intro": "The console of {participant}. Payloads are decrypted on this machine only.",
    "login.username": "Username",
    "login.password": "Password",
    "login.submit": "Sign in",
    "login.refused": "Wrong username or password, or the account is disabled.",
    "login.limited": "Too many refused sign-ins lately: wait a while, or ask a supervisor.",
    "inbox.title": "Inbox",
    "inbox.intro": "New deliveries first, grouped by case.",
    "inbox.empty": "Nothing has been delivered yet.",
    "inbox.unread": "{count} new",
    "inbox.new": "new",
    "field.kind": "Message",
    "field.from": "From",
    "field.to": "To",
    "field.case": "Case",
    "field.status": "Status",
    "field.received_at": "Received",
    "field.sent_at": "Queued",
    "direction.sent": "sent",
    "direction.received": "received",
    "case.title": "Case {case}",
    "case.owner": "Opened by",
    "case.stage": "Stage",
    "case.no_stage": "not known here",
    "case.parties": "Parties",
    "case.deadline": "Next step due",
    "case.no_deadline": "no deadline",
    "case.overdue": "overdue",
    "case.owed_by": "Owed by",
    "case.halted": "Halted",
    "case.halted_by": "consent withdrawn (envelope {envelope})",
    "case.actions": "What you can do",
    "case.timeline": "Timeline",
    "case.timeline_empty": "No message on this case yet.",
    "case.payload": "Contents",
    "case.erased": "The contents were erased after consent was withdrawn.",
    "case.receipt_from": "receipt from {who}",
    "case.unknown": "This case is not known here.",
    "action.reception_confirmed": "Confirm reception",
    "action.consent_withdrawn": "Record consent withdrawal",
    "action.send": "Send: {kind}",
    "form.title": "{kind}",
    "form.on_case": "On case",
    "form.envelope": "Envelope",
    "form.case_ref": "Case reference",
    "form.case_ref_help": (
        "Your own pseudonymous reference: letters, digits, '.', '_' or '-'; never a name or a "
        "document number."
    ),
    "form.case_ref_invalid": (
        "3 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit."
    ),
    "form.recipients": "Recipients",
    "form.recipients_missing": "Choose at least one recipient.",
    "form.optional": "optional",
    "form.choose": "— choose —",
    "form.one_per_line": "One entry per line.",
    "form.utc": "Date and time in UTC.",
    "form.has_errors": "Some fields need correcting; each problem is shown at its field.",
    "form.preview": "Preview",
    "preview.title": "Check before sealing",
    "preview.intro": (
        "Nothing is sealed yet. Once sent, the message is signed and encrypted for the recipients "
        "below and cannot be recalled."
    ),
    "preview.send": "Seal and send",
    "preview.edit": "Edit",
    "sent.notice": "Sealed and queued: {kind}, envelope {envelope}. The adapter publishes it.",
    "reception.title": "Confirm reception",
    "reception.intro": (
        "A signed confirmation that the person was received on case {case} goes to {missions}."
    ),
    "reception.place": "Where",
    "reception.place_help": "e.g. the airport or the shelter; 'not stated' if left empty.",
    "reception.note": "Condition notes",
    "reception.confirm": "Confirm reception",
    "reception.notice": "Reception confirmed: envelope {envelope}.",
    "withdraw.title": "Record consent withdrawal",
    "withdraw.intro": "The person has withdrawn their consent on case {case}.",
    "withdraw.halts": (
        "The case halts at every party ({parties}): nothing but its closing can be sent on it "
        "afterwards."
    ),
    "withdraw.erasure": (
        "If the person asks for deletion: the {count} delivered payload(s) held here are erased at "
        "once, and {parties} each erase theirs and confirm it."
    ),
    "withdraw.no_erasure": "Without deletion, every party keeps what it holds.",
    "withdraw.purposes": "Purposes withdrawn",
    "withdraw.delete_data": "The person asks for their data to be deleted",
    "withdraw.note": "Notes",
    "withdraw.send": "Send the withdrawal",
    "withdraw.notice": "Consent withdrawal sent: envelope {envelope}.",
    "outbox.title": "Outbox",
    "outbox.intro": "What this participant sent, newest first, with each recipient's receipt.",
    "outbox.empty": "Nothing was sent from here.",
    "outbox.receipts": "Receipts",
    "outbox.published": "published",
    "outbox.waiting": "waiting for the broker",
    "outbox.receipt_yes": "received",
    "outbox.receipt_no": "awaited",
    "quarantine.title": "Quarantine",
    "quarantine.intro": (
        "Envelopes refused on arrival, and why. Requeue one once its cause is fixed."
    ),
    "quarantine.empty": "The quarantine is empty.",
    "quarantine.reason": "Reason",
    "quarantine.detail": "Envelope",
    "quarantine.requeue": "Requeue",
    "quarantine.notice": "Sent back to the inbox: {entry}.",
    "cases.title": "Every case",
    "cases.intro": "Every case the routing service tracks, overdue first.",
    "cases.empty": "No case is tracked yet.",
    "headers.intro": "Headers only: who sent what to whom and when. No payload is readable here.",
    "headers.anomaly": "Anomaly",
    "audit.title": "Audit",
    "audit.intro": (
        "Verify an export of the routing log (trm audit export) against the directory installed "
        "here, and browse its cases: headers only."
    ),
    "audit.upload": "Verify an export",
    "audit.export": "Export file",
    "audit.export_help": "The file written by trm audit export.",
    "audit.checkpoint": "Kept checkpoint",
    "audit.checkpoint_help": (
        "Optional: a signed checkpoint kept from an earlier export, which this one must extend."
    ),
    "audit.verify": "Verify",
    "audit.missing": "Choose the export file to verify.",
    "audit.checkpoint_too_large": "That is not a kept checkpoint: it is far larger than one.",
    "audit.jobs": "Verifications",
    "audit.no_jobs": "No export verified yet.",
    "audit.job_title": "Verification",
    "audit.state.running": "verifying",
    "audit.state.intact": "intact",
    "audit.state.tampered": "tampered",
    "audit.state.failed": "could not be verified",
    "audit.intact": "Intact: {entries} entries and {checkpoints} checkpoints verified.",
    "audit.tampered": "Not intact: the first bad entry is {index}.",
    "audit.failed": "The export could not be verified.",
    "audit.envelopes_ok": "Envelope signatures verified",
    "audit.rejected": "Recorded as rejected",
    "audit.root": "Merkle root",
    "audit.log": "Log of",
    "audit.witnesses": "Witnesses",
    "audit.quorum": "{quorum} required",
    "audit.cases": "Cases in the export",
    "error.title": "Cannot do that",
    "error.forbidden": "Your account cannot do this.",
    "error.not_found": "Not found here.",
}

_RU: dict[str, str] = {
    "nav.label": "Разделы",
    "nav.inbox": "Входящие",
    "nav.cases": "Дела",
    "nav.outbox": "Исходящие",
    "nav.quarantine": "Карантин",
    "nav.audit": "Аудит",
    "nav.new.return_request": "Новый запрос о возвращении",
    "nav.new.referral_request": "Новая переадресация",
    "role.case_worker": "сотрудник по делам",
    "role.supervisor": "руководитель",
    "role.read_only": "только чтение",
    "language.switch": "English",
    "logout": "Выйти",
    "yes": "да",
    "no": "нет",
    "cancel": "Отмена",
    "back": "Назад",
    "back_home": "На начальную страницу",
    "login.title": "Вход",
    "login.intro": (
        "Консоль участника {participant}. Содержимое расшифровывается только на этом компьютере."
    ),
    "login.username": "Имя пользователя",
    "login.password": "Пароль",
    "login.submit": "Войти",
    "login.refused": "Неверное имя пользователя или пароль, либо учётная запись отключена.",
    "login.limited": (
        "Слишком много неудачных попыток входа: подождите или обратитесь к руководителю."
    ),
    "inbox.title": "Входящие",
    "inbox.intro": "Сначала новые поступления, по делам.",
    "inbox.empty": "Пока ничего не поступало.",
    "inbox.unread": "новых: {count}",
    "inbox.new": "новое",
    "field.kind": "Сообщение",
    "field.from": "От",
    "field.to": "Кому",
    "field.case": "Дело",
    "field.status": "Состояние",
    "field.received_at": "Получено",
    "field.sent_at": "Поставлено в очередь",
    "direction.sent": "отправлено",
    "direction.received": "получено",
    "case.title": "Дело {case}",
    "case.owner": "Открыто",
    "case.stage": "Этап",
    "case.no_stage": "здесь неизвестен",
    "case.parties": "Участники",
    "case.deadline": "Срок следующего шага",
    "case.no_deadline": "срока нет",
    "case.overdue": "просрочено",
    "case.owed_by": "За кем шаг",
    "case.halted": "Остановлено",
    "case.halted_by": "согласие отозвано (конверт {envelope})",
    "case.actions": "Доступные действия",
    "case.timeline": "Ход дела",
    "case.timeline_empty": "По этому делу пока нет сообщений.",
    "case.payload": "Содержимое",
    "case.erased": "Содержимое удалено после отзыва согласия.",
    "case.receipt_from": "подтверждение от {who}",
    "case.unknown": "Это дело здесь неизвестно.",
    "action.reception_confirmed": "Подтвердить приём",
    "action.consent_withdrawn": "Записать отзыв согласия",
    "action.send": "Отправить: {kind}",
    "form.title": "{kind}",
    "form.on_case": "По делу",
    "form.envelope": "Конверт",
    "form.case_ref": "Номер дела",
    "form.case_ref_help": (
        "Ваш собственный псевдонимный номер: буквы, цифры, «.», «_» или «-»; никогда не имя и не "
        "номер документа."
    ),
    "form.case_ref_invalid": "От 3 до 64 букв, цифр, «.», «_» или «-», начиная с буквы или цифры.",
    "form.recipients": "Получатели",
    "form.recipients_missing": "Выберите хотя бы одного получателя.",
    "form.optional": "необязательно",
    "form.choose": "— выберите —",
    "form.one_per_line": "По одному значению в строке.",
    "form.utc": "Дата и время по UTC.",
    "form.has_errors": "Некоторые поля нужно исправить; каждая ошибка показана у своего поля.",
    "form.preview": "Предпросмотр",
    "preview.title": "Проверьте перед запечатыванием",
    "preview.intro": (
        "Ещё ничего не запечатано. После отправки сообщение подписывается и шифруется для "
        "указанных получателей, отозвать его нельзя."
    ),
    "preview.send": "Запечатать и отправить",
    "preview.edit": "Изменить",
    "sent.notice": (
        "Запечатано и поставлено в очередь: {kind}, конверт {envelope}. Адаптер опубликует его."
    ),
    "reception.title": "Подтвердить приём",
    "reception.intro": (
        "Подписанное подтверждение приёма человека по делу {case} уйдёт: {missions}."
    ),
    "reception.place": "Где",
    "reception.place_help": "например, аэропорт или приют; если пусто — «не указано».",
    "reception.note": "Заметки о состоянии",
    "reception.confirm": "Подтвердить приём",
    "reception.notice": "Приём подтверждён: конверт {envelope}.",
    "withdraw.title": "Записать отзыв согласия",
    "withdraw.intro": "Человек отозвал своё согласие по делу {case}.",
    "withdraw.halts": (
        "Дело останавливается у всех участников ({parties}): после этого по нему можно отправить "
        "только закрытие."
    ),
    "withdraw.erasure": (
        "Если человек просит удалить данные: доставленное сюда содержимое ({count}) удаляется "
        "сразу, а {parties} удаляют своё и подтверждают это."
    ),
    "withdraw.no_erasure": "Без удаления каждый участник сохраняет то, что у него есть.",
    "withdraw.purposes": "Отзываемые цели",
    "withdraw.delete_data": "Человек просит удалить свои данные",
    "withdraw.note": "Заметки",
    "withdraw.send": "Отправить отзыв согласия",
    "withdraw.notice": "Отзыв согласия отправлен: конверт {envelope}.",
    "outbox.title": "Исходящие",
    "outbox.intro": "Отправленное отсюда, сначала новое, с подтверждением от каждого получателя.",
    "outbox.empty": "Отсюда ничего не отправлялось.",
    "outbox.receipts": "Подтверждения",
    "outbox.published": "опубликовано",
    "outbox.waiting": "ожидает брокера",
    "outbox.receipt_yes": "получено",
    "outbox.receipt_no": "ожидается",
    "quarantine.title": "Карантин",
    "quarantine.intro": (
        "Конверты, отклонённые при получении, и причины. Верните конверт в очередь, когда причина "
        "устранена."
    ),
    "quarantine.empty": "Карантин пуст.",
    "quarantine.reason": "Причина",
    "quarantine.detail": "Конверт",
    "quarantine.requeue": "Вернуть в очередь",
    "quarantine.notice": "Возвращено во входящие: {entry}.",
    "cases.title": "Все дела",
    "cases.intro": "Все дела, которые ведёт служба маршрутизации, сначала просроченные.",
    "cases.empty": "Пока нет ни одного дела.",
    "headers.intro": (
        "Только заголовки: кто, что, кому и когда отправил. Содержимое здесь прочитать нельзя."
    ),
    "headers.anomaly": "Нарушение",
    "audit.title": "Аудит",
    "audit.intro": (
        "Проверьте выгрузку журнала маршрутизации (trm audit export) по установленному здесь "
        "справочнику и просмотрите её дела: только заголовки."
    ),
    "audit.upload": "Проверить выгрузку",
    "audit.export": "Файл выгрузки",
    "audit.export_help": "Файл, записанный командой trm audit export.",
    "audit.checkpoint": "Сохранённая контрольная точка",
    "audit.checkpoint_help": (
        "Необязательно: подписанная контрольная точка из прежней выгрузки, которую эта должна "
        "продолжать."
    ),
    "audit.verify": "Проверить",
    "audit.missing": "Выберите файл выгрузки для проверки.",
    "audit.checkpoint_too_large": "Это не контрольная точка: файл намного больше неё.",
    "audit.jobs": "Проверки",
    "audit.no_jobs": "Пока ни одна выгрузка не проверялась.",
    "audit.job_title": "Проверка",
    "audit.state.running": "идёт проверка",
    "audit.state.intact": "не изменена",
    "audit.state.tampered": "изменена",
    "audit.state.failed": "проверить не удалось",
    "audit.intact": (
        "Не изменена: проверено записей — {entries}, контрольных точек — {checkpoints}."
    ),
    "audit.tampered": "Изменена: первая неверная запись — {index}.",
    "audit.failed": "Выгрузку проверить не удалось.",
    "audit.envelopes_ok": "Проверено подписей конвертов",
    "audit.rejected": "Записано как отклонённые",
    "audit.root": "Корень дерева Меркла",
    "audit.log": "Журнал участника",
    "audit.witnesses": "Свидетели",
    "audit.quorum": "требуется {quorum}",
    "audit.cases": "Дела в выгрузке",
    "error.title": "Это сделать нельзя",
    "error.forbidden": "Вашей учётной записи это не разрешено.",
    "error.not_found": "Здесь такого нет.",
}


_FIELD_LABELS_RU: dict[str, str] = {
    "about_envelope": "О конверте",
    "accompanying_children": "Сопровождающие дети",
    "applied_at": "Применено",
    "arrive_at": "Куда",
    "arrives_at": "Прибытие",
    "assistance_before_departure": "Помощь до выезда",
    "carrier": "Перевозчик",
    "closed_at": "Закрыто",
    "completed_at": "Завершено",
    "condition_notes": "Заметки о состоянии",
    "conditions": "Условия",
    "consent": "Согласие",
    "data": "Данные",
    "date_of_birth": "Дата рождения",
    "deadline": "Срок",
    "delete_data": "Удалить данные",
    "depart_from": "Откуда",
    "departed_at": "Время выезда",
    "departs_at": "Отправление",
    "destination_country": "Страна назначения",
    "digest": "Хэш",
    "documents_issued": "Выданные документы",
    "done": "Выполнено",
    "earliest": "Не ранее",
    "envelope_id": "Конверт",
    "erased_at": "Удалено",
    "erased_payloads": "Удалено содержимого",
    "escort": "Сопровождение",
    "escort_role": "Роль сопровождающего",
    "escorts": "Сопровождающие",
    "full_name": "Полное имя",
    "given_at": "Дано",
    "handover_place": "Место передачи",
    "identity_document": "Удостоверение личности",
    "informed_and_voluntary": "Информированное и добровольное",
    "issuing_authority": "Выдавший орган",
    "itinerary_ref": "Номер маршрута",
    "language": "Язык",
    "languages": "Языки",
    "latest": "Не позднее",
    "legs": "Участки пути",
    "mode": "Вид транспорта",
    "name": "Имя",
    "nationality": "Гражданство",
    "next_review": "Следующий пересмотр",
    "not_done_reason": "Причина невыполнения",
    "note": "Заметка",
    "notes": "Заметки",
    "organisation": "Организация",
    "origin_country": "Страна происхождения",
    "overdue": "Просрочено",
    "owed_by": "За кем шаг",
    "person": "Человек",
    "place": "Место",
    "planned_arrival": "Плановое прибытие",
    "purposes": "Цели",
    "reason": "Причина",
    "received_at": "Принят(а)",
    "received_by": "Кто принял",
    "receiving_ngo": "Принимающая НКО",
    "reception_needs": "Потребности при приёме",
    "recorded_by": "Кто записал",
    "referrer_type": "Кто направил",
    "role": "Роль",
    "scope": "Объём",
    "service_country": "Страна услуг",
    "service_number": "Номер рейса или поезда",
    "services": "Услуги",
    "services_delivered": "Оказанные услуги",
    "services_needed": "Нужные услуги",
    "services_offered": "Предлагаемые услуги",
    "sex": "Пол",
    "share_with": "Кому передавать",
    "shelter": "Приют",
    "staff_id": "Табельный номер",
    "stage": "Этап",
    "stages": "Этапы",
    "started_at": "Начато",
    "status": "Состояние",
    "transport_needs": "Потребности в транспорте",
    "travel_documents": "Проездные документы",
    "travel_window": "Окно поездки",
    "type": "Тип",
    "urgent": "Срочно",
    "valid_until": "Действителен до",
    "withdrawal": "Отзыв",
    "withdrawn_at": "Отозвано",
}
"""Russian labels of the payloads' fields; English ones are the field names themselves."""

_VALUE_LABELS_RU: dict[str, str] = {
    "accommodation": "жильё",
    "air": "самолёт",
    "airport_reception": "встреча в аэропорту",
    "arrival": "прибытие",
    "case_monitoring": "наблюдение за делом",
    "cash_assistance": "денежная помощь",
    "cash_installments": "денежные выплаты",
    "centre_for_migrants_abroad": "центр для мигрантов за рубежом",
    "certificate_of_return": "свидетельство на возвращение",
    "clothes_and_food": "одежда и питание",
    "completed": "завершено",
    "consent_not_verifiable": "согласие нельзя проверить",
    "consent_withdrawn": "согласие отозвано",
    "contact": "контакты",
    "departure": "выезд",
    "destroyed": "уничтожен",
    "duplicate": "дубликат",
    "embassy_or_consulate": "посольство или консульство",
    "entry_visa": "въездная виза",
    "equipment": "оборудование",
    "escort": "сопровождение",
    "exit_permit": "разрешение на выезд",
    "expired": "просрочен",
    "exploitation_history": "история эксплуатации",
    "family": "семья",
    "family_contact": "связь с семьёй",
    "female": "женский",
    "health": "здоровье",
    "held_by_exploiter": "у эксплуататора",
    "hotline": "горячая линия",
    "id_document_recovery": "восстановление документов",
    "identity": "личность",
    "identity_not_confirmed": "личность не подтверждена",
    "in_progress": "в процессе",
    "insufficient_information": "недостаточно сведений",
    "interpretation": "устный перевод",
    "job_counselling": "профориентация",
    "law_enforcement": "правоохранительные органы",
    "law_enforcement_cooperation": "сотрудничество с правоохранительными органами",
    "legal": "юридическая помощь",
    "legal_consultation": "юридическая консультация",
    "lost": "утерян",
    "lost_contact": "связь потеряна",
    "male": "мужской",
    "medical": "медицинская помощь",
    "medical_screening": "медицинское обследование",
    "ministry": "министерство",
    "monitoring": "наблюдение",
    "never_had": "никогда не было",
    "ngo": "НКО",
    "no_capacity": "нет возможности",
    "not_country_of_origin": "не страна происхождения",
    "not_eligible": "не соответствует условиям",
    "not_recorded": "не указан",
    "other": "другое",
    "outside_mandate": "вне мандата",
    "passport": "паспорт",
    "person_changed_plans": "человек изменил планы",
    "person_declined": "человек отказался",
    "person_unreachable": "с человеком нет связи",
    "planned": "запланировано",
    "psychological": "психологическая помощь",
    "psychological_first_aid": "первая психологическая помощь",
    "rail": "поезд",
    "reception": "приём",
    "red_cross": "Красный Крест",
    "referral": "переадресация",
    "referred_elsewhere": "направлен(а) в другое место",
    "registration": "регистрация",
    "reintegrated": "реинтегрирован(а)",
    "reintegration": "реинтеграция",
    "reintegration_grant": "грант на реинтеграцию",
    "release_from_exploitation": "освобождение от эксплуатации",
    "replacement_requested": "запрошена замена",
    "resolved_locally": "решено на месте",
    "return_assistance": "помощь в возвращении",
    "road": "автомобиль",
    "safety_risk_on_return": "угроза безопасности при возвращении",
    "sea": "морем",
    "self": "сам(а)",
    "sent_in_error": "отправлено по ошибке",
    "service_unavailable": "услуга недоступна",
    "social": "социальная помощь",
    "suspended": "приостановлено",
    "temporary_document_issued": "выдан временный документ",
    "temporary_shelter": "временный приют",
    "temporary_travel_document": "временный проездной документ",
    "temporary_travel_documents": "временные проездные документы",
    "transferred": "передано",
    "transit": "транзит",
    "transit_visa": "транзитная виза",
    "transport_to_shelter": "доставка в приют",
    "travel_arrangement": "организация поездки",
    "travel_costs": "оплата проезда",
    "travel_documents": "проездные документы",
    "unknown": "неизвестно",
    "valid": "действителен",
    "visa_or_registration": "виза или регистрация",
    "vocational_training": "профессиональное обучение",
    "whole_journey": "весь путь",
}
"""Russian words for the enumerations' values; English ones are the values themselves."""


def _with_vocabulary(
    words: dict[str, str],
    kinds: Mapping[MessageKind, str],
    stages: Mapping[Stage, str],
    fields: Mapping[str, str],
    values: Mapping[str, str],
) -> Mapping[str, str]:
    merged = dict(words)
    merged.update({f"kind.{kind}": text for kind, text in kinds.items()})
    merged.update({f"stage.{stage}": text for stage, text in stages.items()})
    merged.update({f"label.{name}": text for name, text in fields.items()})
    merged.update({f"value.{value}": text for value, text in values.items()})
    return MappingProxyType(merged)


CATALOGUES: Mapping[str, Mapping[str, str]] = MappingProxyType(
    {
        "en": _with_vocabulary(
            _EN,
            _KINDS_EN,
            _STAGES_EN,
            {name: name.replace("_", " ").capitalize() for name in _FIELD_LABELS_RU},
            {value: value.replace("_", " ") for value in _VALUE_LABELS_RU},
        ),
        "ru": _with_vocabulary(_RU, _KINDS_RU, _STAGES_RU, _FIELD_LABELS_RU, _VALUE_LABELS_RU),
    }
)
"""Language -> key -> text."""


def language_of(value: str | None) -> str:
    """`value` if it is a language the console speaks, else the default."""
    return value if value is not None and value in CATALOGUES else DEFAULT_LANGUAGE


def language_from_header(accept_language: str | None) -> str:
    """The first language of an ``Accept-Language`` header the console speaks, else English."""
    for part in (accept_language or "").split(","):
        tag = part.split(";", 1)[0].strip().lower()[:2]
        if tag in CATALOGUES:
            return tag
    return DEFAULT_LANGUAGE


def translate(language: str, key: str, **values: object) -> str:
    """The text of `key` in `language` with its placeholders filled; the key itself if unknown.

    An unknown key shows as itself rather than failing the page; the
    catalogue test makes sure no template uses one.
    """
    text = CATALOGUES[language_of(language)].get(key, key)
    return text.format(**values) if values else text


def field_label(language: str, name: str) -> str:
    """The label of a payload's field (``person.full_name`` or ``full_name``) in `language`."""
    key = next((part for part in reversed(name.split(".")) if not part.isdigit()), name)
    words = CATALOGUES[language_of(language)]
    return words.get(f"label.{key}", key.replace("_", " ").capitalize())


def value_label(language: str, value: str) -> str:
    """An enumeration's value in `language`; any other value (a participant id) as it is."""
    return CATALOGUES[language_of(language)].get(f"value.{value}", value)


def translator(language: str) -> Translate:
    """`translate` bound to `language`, as templates call it: ``t('key', name=value)``."""
    chosen = language_of(language)

    def t(key: str, **values: object) -> str:
        return translate(chosen, key, **values)

    return t


def set_language(engine: Engine, username: str, language: str) -> None:
    """Make `language` the pages' language for `username` (an unknown one is the default)."""
    from console.tables import users_table

    chosen = language_of(language)
    with storage_errors("saving a console user's language"), engine.begin() as conn:
        conn.execute(
            users_table.update().where(users_table.c.username == username).values(language=chosen)
        )
