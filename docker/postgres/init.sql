-- One database per service: a participant's outbox and inbox are its own.
CREATE DATABASE trm_routing OWNER trm;
CREATE DATABASE trm_iom_kz OWNER trm;
CREATE DATABASE trm_iom_uz OWNER trm;
